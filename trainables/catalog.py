"""The architectures and encoders by name. Kept free of torch so that the CLI and the config
check answer in a second: importing torch and torchvision takes ~5 s on a small machine."""

ARCHS = ("cnn-lstm", "resnet-gru")
VGG_ENCODERS = ("vgg-small", "vgg11", "vgg13", "vgg16", "vgg19")
RESNET_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
