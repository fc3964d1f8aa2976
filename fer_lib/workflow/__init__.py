"""Workflow: experiments as papermill pipelines over the notebooks, and the Jupyter kernel.

    plan      experiment files (experiments/*.toml), placeholders, planning: runs, run ids, completion markers
    run       the results folder's lock, worker processes, resumability, the command line
    report    summaries, the headline table (metrics.json read at fer_lib.metrics.HEADLINE_PATHS), HTML index
    pipeline  the command (`python -m fer_lib pipeline`), the experiment file format, and the names above
    jupyter   the project's Jupyter kernel and JupyterLab launcher; `current_parameters` inside a notebook
"""
