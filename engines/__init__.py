"""Inference only: model bundles and the backends that run them. Knows nothing of radars or MQTT.

Importing any module of this package loads no native library; backends import theirs in
``load()``. The backend interface is :mod:`iaflash.engines.base`, the factory
:mod:`iaflash.engines.factory`, bundles :mod:`iaflash.engines.bundle`.
"""
