"""keras_cspine: cervical spine fracture detection in CT with Keras 3."""

__version__ = "0.1.0"
