"""Names of the MoE scalars the hooks put in the message hub.

mmengine's LogProcessor strips the ``train/`` / ``val/`` / ``test/`` prefix, so the
mode is repeated in the logged name: train and val stay apart in the JSON log and
in TensorBoard. mmdet's ``analyze_logs.py`` reads every key of a log line that
holds a ``/`` as an evaluation metric, keyed by its last component, and skips the
keys after it (``epoch``, ``iter``, ``step``): training scalars therefore have no
``/``, evaluation scalars have one, with the layer in their last component.
"""


def moe_scalar_name(mode: str, layer: str, key: str) -> str:
    """``train/moe_train.<layer>.<key>`` or ``<mode>/moe_<mode>/<layer>.<key>``
    (logged as ``moe_train.<layer>.<key>``, ``moe_val/<layer>.<key>``)."""
    if mode == 'train':
        return f'train/moe_train.{layer}.{key}'
    return f'{mode}/moe_{mode}/{layer}.{key}'
