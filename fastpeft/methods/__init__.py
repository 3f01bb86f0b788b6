"""PEFT methods as plug-ins: one file per method, holding its config and its
:class:`~fastpeft.methods.base.PeftMethod` subclass (decorated with
:func:`~fastpeft.methods.base.register_method`, keyed by ``peft_type``).

Every public module of this package is imported on first use of the registry, so adding a
method is adding one file here (plus its kernel / layer, if it has one); ``fastpeft.<Name>Config``,
``fastpeft.config.<Name>Config``, ``config_from_dict`` and checkpoints find it by itself.
"""
import importlib
import pkgutil

from fastpeft.methods.base import PeftMethod, method_for, register_method, registered

__all__ = ["PeftMethod", "register_method", "registered", "method_for"]

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
