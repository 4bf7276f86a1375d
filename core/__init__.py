"""The ground floor: what every layer shares, importing nothing of the project (numpy at most).

- :mod:`core.errors`: the one error type for bad input (:class:`~core.errors.UserError`) and the
  runner every command line goes through (:func:`~core.errors.run_cli`: one line + exit 2);
- :mod:`core.model_info`: :class:`~core.model_info.ModelInfo`, the numbers of the model a store,
  a checkpoint or a cache talks about, and the phase codes of a token (``PREFILL``, ``DECODE``);
- :mod:`core.passes`: a store's forward passes as flat arrays (:class:`~core.passes.Passes`), the
  input of the simulator, the eviction policies and the reuse forecasters alike.

``data_pipeline``, ``predictors``, ``offload`` and ``reporting`` build on it; nothing here imports them.
"""
