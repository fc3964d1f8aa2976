"""Workflow: experiments as papermill pipelines over the notebooks (pipeline), the Jupyter kernel
and JupyterLab launcher (jupyter)."""
