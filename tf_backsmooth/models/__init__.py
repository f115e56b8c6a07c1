"""Model zoo: ``get(name, num_classes, input_shape, mean, std, **kwargs)``.

Every model takes images in [0, 1] of ``input_shape``, normalises them with a
built-in ``keras.layers.Normalization`` as its first layer (so attack budgets
stay in pixel units) and returns logits (no softmax). Models use only built-in
Keras layers and the functional API, so a saved ``model.keras`` loads with
plain ``keras.models.load_model`` without tf_backsmooth installed.

Registered models: ``small_cnn``, ``mnist_cnn``, ``madry_cnn``, ``mlp`` (see
:mod:`.cnn`), ``resnet18``, ``preact_resnet18`` (:mod:`.resnet`) and
``wide_resnet`` (:mod:`.wide_resnet`). Add one with :func:`register`.
"""

from tf_backsmooth.models import cnn, resnet, wide_resnet  # noqa: F401  (registers)
from tf_backsmooth.models.registry import (
    INITS,
    MODELS,
    get,
    has_batchnorm,
    normalization,
    register,
    torch_init,
)

__all__ = ["INITS", "MODELS", "torch_init", "get", "has_batchnorm", "normalization", "register"]
