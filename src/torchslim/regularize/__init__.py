"""What drives groups to zero during training: GroupLasso (with its size budget), L1, ForceRegularizer, ZeroMask."""
