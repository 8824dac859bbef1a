"""Models and images: the pretrained models and ``--model`` specs (:mod:`.models`), ImageNet
class names (:mod:`.imagenet`) and the batched image pipeline of ``tsgb explain``
(:mod:`.pipeline`)."""
