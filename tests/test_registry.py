"""custom_imports=['mmdet_moe'] in a config registers the components in mmdet's registries."""
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow


def test_custom_imports_registers_into_mmdet(tmp_path):
    config = tmp_path / 'moe_fpn.py'
    config.write_text(textwrap.dedent('''
        custom_imports = dict(imports=['mmdet_moe'], allow_failed_imports=False)
        model = dict(type='MoEFPN', in_channels=[8, 16], out_channels=8, num_outs=2)
    '''))
    script = textwrap.dedent(f'''
        import sys
        from mmengine.config import Config
        from mmdet.registry import HOOKS, MODELS
        assert 'mmdet_moe' not in sys.modules
        assert MODELS.get('MoEFPN') is None
        cfg = Config.fromfile({str(config)!r})
        neck = MODELS.build(cfg.model)
        print(type(neck).__module__, MODELS.get('MoERetinaHead').__name__)
    ''')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['mmdet_moe.models.necks.moe_fpn', 'MoERetinaHead']
