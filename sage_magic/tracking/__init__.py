"""Run tracking (TensorBoard, MLflow, W&B) for training and evaluation, without a tracker in the caller.

``report`` is what the faces and the engine call: it checks trackers before a run, builds the training child's
environment, and logs an evaluation through ``mlflow_child`` in a process of its own.
"""
