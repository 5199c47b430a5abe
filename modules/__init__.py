"""Models (plain TorchRec modules) and LightningModules that train them."""
