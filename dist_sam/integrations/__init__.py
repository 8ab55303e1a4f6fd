"""Integrations with training frameworks, one subpackage each, imported only when used.

``import dist_sam`` imports none of them (nor their frameworks); each one hands the framework's
own wrapped model to the one step core (:func:`dist_sam.sam_step` or the DeepSpeed engine adapter).
"""

__all__: list[str] = []
