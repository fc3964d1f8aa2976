"""fer_lib: interpretable facial expression recognition guided by action-unit cues.

One module per step of the data flow (see README): landmarks -> au -> data -> models ->
losses -> train -> interpret -> explain; pipeline runs the notebooks with papermill.
"""
__version__ = "0.1.0"
