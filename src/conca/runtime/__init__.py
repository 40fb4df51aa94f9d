"""Where code runs: devices and ``torch.distributed``. Part of the bottom layer (imports nothing
from conca but its errors), so activations, dictionaries and training may all use it."""
