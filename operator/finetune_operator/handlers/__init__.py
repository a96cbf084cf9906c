"""kopf handlers; importing this package registers them."""

from finetune_operator.handlers import finetunejob, indexes, modeldeployment, trainer_children

__all__ = ["finetunejob", "indexes", "modeldeployment", "trainer_children"]
