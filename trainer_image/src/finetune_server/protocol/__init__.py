"""The data plane: thin REST adapters over the model object."""
