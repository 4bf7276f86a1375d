"""What a user reads after a run: figures that always say something, and one self-contained HTML page.

The numbers come from the three entry points' own report modules (``offload.report`` for simulator
sweeps, ``offload.engine.report`` for the engine, ``predictors.report`` for ``train.py``); this
package holds what they share: figure bookkeeping (:mod:`reporting.figures`), where a run came from
(:mod:`reporting.provenance`) and the HTML page (:mod:`reporting.html`, a Jinja2 template).
"""
