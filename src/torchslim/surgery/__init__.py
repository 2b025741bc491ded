"""What cuts them out: ``compact`` and ``verify``, kernel shrinking, ``lowrank``, the magnitude baseline."""
