"""finetune_server: the inference server of a ModelDeployment (``python -m finetune_server --config PATH``).

Shaped like KServe's model server: a model object with load/ready/predict (``model.py``), a data plane of
thin REST adapters (``protocol/``), and one module that maps errors onto HTTP status (``errors.py``).
Importing this package does not import torch; ``model.py`` does, on load.
"""
