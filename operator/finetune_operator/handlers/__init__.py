"""kopf handlers; importing this package registers them."""

from finetune_operator.handlers import children, finetunejob, modeldeployment

__all__ = ["children", "finetunejob", "modeldeployment"]
