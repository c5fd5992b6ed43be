"""The network (the only place with Flax modules): ResNet backbone, FPN, heads, RetinaNet.

`retinanet.build(config)` gives the module; `torchvision_weights` loads torchvision
checkpoints into its variables.
"""
