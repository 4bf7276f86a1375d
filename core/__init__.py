"""The ground floor: what every layer shares, importing nothing of the project (numpy at most).

- :mod:`core.errors`: the one error type for bad input (:class:`~core.errors.UserError`) and the
  runner every command line goes through (:func:`~core.errors.run_cli`: one line + exit 2).

``data_pipeline``, ``predictors``, ``offload`` and ``reporting`` build on it; nothing here imports them.
"""
