"""Packaging: the plugin installs into an existing MMDetection environment, and its
configs ship inside the package (``_base_ = 'mmdet_moe::<path under configs/>'``).

- ``pip install .`` (not editable), run in a fresh venv that sees this environment's
  packages (a ``.pth`` file naming its site-packages: what ``--system-site-packages``
  gives for a system Python), installs mmdet_moe alone: torch, mmcv, mmengine and
  mmdet keep their versions and files, and pip neither builds nor fetches them;
- there, from a folder outside the checkout, a user's config inherits a provided one
  from the installed package (the toy config, and a COCO config that itself inherits
  ``mmdet::``), with an override; the model builds, and so does a Runner (the
  inherited custom hooks and evaluator are in the scope ``mmdet_moe``);
- the same in this environment (editable install: the checkout's ``configs/``).
"""
import importlib
import json
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STACK = ('torch', 'mmcv', 'mmengine', 'mmdet')
TOY = 'toy/retinanet_r18_fpn_moe-head_4e_toy-coco.py'
COCO = 'moe_retinanet/retinanet_r50_moe-cls-head_1x_coco.py'

# outside git: what the test's copy of the checkout leaves out: environments,
# outputs, data, build products (at the top) and caches, egg-info and the editable
# link (anywhere)
TOP_LEVEL_SKIPPED = {'.git', '.venv', 'work_dirs', 'data', 'build', 'dist', 'docs',
                     'vis'}
SKIPPED = shutil.ignore_patterns('__pycache__', '*.py[cod]', '*.egg-info',
                                 '.pytest_cache', '.mim')

# the state of the stack as the interpreter running it sees it, without importing it
SNAPSHOT = textwrap.dedent('''
    import importlib.metadata as md, importlib.util, json, os, sys
    out = {}
    for name in sys.argv[1:]:
        dist = md.distribution(name)
        record = next(f for f in dist.files if f.name == 'RECORD')
        out[name] = dict(version=dist.version,
                         location=str(dist.locate_file('')),
                         module=importlib.util.find_spec(name).origin,
                         record_mtime=os.stat(record.locate()).st_mtime_ns)
    print(json.dumps(out))
''')

# a user's configs in their own folder
USER_CONFIG = f'''
_base_ = 'mmdet_moe::{TOY}'
model = dict(bbox_head=dict(num_experts=8))
'''
USER_COCO_CONFIG = f'''
_base_ = 'mmdet_moe::{COCO}'
model = dict(bbox_head=dict(top_k=1))
'''

# run from the user's folder: what a user's script does (import mmdet_moe first)
CHECK = textwrap.dedent('''
    import json, os.path as osp, sys
    from mmengine.config import Config

    # before mmdet_moe is imported, mmengine does not know the prefix (it parses
    # _base_ before custom_imports): what mmdet's own tools/train.py would meet
    try:
        Config.fromfile('my_cfg.py')
        before = None
    except AssertionError as e:
        before = str(e)

    import mmdet_moe
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    cfg = Config.fromfile('my_cfg.py')
    coco = Config.fromfile('my_coco_cfg.py')
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    coco_model = MODELS.build(coco.model)

    # inherited through mmdet_moe::, these dicts are built in the scope mmdet_moe
    scopes = dict(custom_hooks=[h.get('_scope_') for h in cfg.custom_hooks],
                  val_evaluator=cfg.val_evaluator.get('_scope_'))
    cfg.work_dir = 'work_dir'
    cfg.val_evaluator.ann_file = None  # no toy data here
    runner = Runner.from_cfg(cfg)
    evaluator = runner.build_evaluator(cfg.val_evaluator)
    print('RESULT', json.dumps(dict(
        before=before,
        package=osp.dirname(mmdet_moe.__file__),
        text=cfg.text, coco_text=coco.text,
        model=type(model).__name__,
        num_experts=model.bbox_head.moe_kwargs['num_experts'],
        coco_model=type(coco_model).__name__,
        coco_head=type(coco_model.bbox_head).__name__,
        coco_top_k=coco_model.bbox_head.moe_kwargs['top_k'],
        coco_backbone_depth=coco.model.backbone.depth,
        scopes=scopes,
        hooks=[type(h).__name__ for h in runner.hooks],
        metrics=[type(m).__name__ for m in evaluator.metrics])))
''')


def copy_checkout(dst: Path) -> None:
    """The working tree as a clone has it plus uncommitted changes: the files git
    tracks or would track (outside git: all but the skipped)."""
    try:
        listed = subprocess.run(['git', 'ls-files', '-z', '-co', '--exclude-standard'],
                                cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        def ignore(folder, names):
            skipped = set(SKIPPED(folder, names))
            if Path(folder).resolve() == ROOT:
                skipped |= TOP_LEVEL_SKIPPED & set(names)
            return skipped
        shutil.copytree(ROOT, dst, ignore=ignore)
        return
    for name in filter(None, listed.decode().split('\0')):
        if (ROOT / name).is_file():  # not deleted in the working tree
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)


def run_check(python, folder: Path) -> dict:
    """Write the user's configs into ``folder`` and run CHECK there."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'my_cfg.py').write_text(USER_CONFIG)
    (folder / 'my_coco_cfg.py').write_text(USER_COCO_CONFIG)
    out = subprocess.run([str(python), '-c', CHECK], cwd=folder, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    # no build fell back from the scope mmdet_moe to another registry
    assert 'Failed to search registry' not in out.stdout + out.stderr
    assert 'mmdet_moe is not installed' not in out.stdout + out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith('RESULT '))
    return json.loads(line[len('RESULT '):])


def check_result(result: dict, package: Path) -> None:
    """The user's configs resolved from ``package``'s .mim/configs and built."""
    assert 'does not support to load mmdet_moe config' in result['before']
    assert Path(result['package']) == package
    configs = package / '.mim' / 'configs'
    # Config.text starts each file's text with its path: the bases came from there
    assert f'{configs / TOY}\n' in result['text']
    assert f'{configs / COCO}\n' in result['coco_text']
    assert '/mmdet/.mim/configs/retinanet/retinanet_r50_fpn_1x_coco.py\n' \
        in result['coco_text']
    assert result['model'] == 'MoERetinaNet' and result['num_experts'] == 8
    assert (result['coco_model'], result['coco_head']) == ('MoERetinaNet',
                                                           'MoERetinaHead')
    assert result['coco_top_k'] == 1 and result['coco_backbone_depth'] == 50
    assert result['scopes'] == dict(custom_hooks=['mmdet_moe', 'mmdet_moe'],
                                    val_evaluator='mmdet_moe')
    assert {'ExpertSizeStatsHook', 'ExpertUtilisationHook'} <= set(result['hooks'])
    assert result['metrics'] == ['CocoMetric']


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """A fresh venv that sees this environment's packages, with ``pip install .``
    of a copy of the checkout."""
    tmp = tmp_path_factory.mktemp('packaging')
    src = tmp / 'mmdet-moe'
    copy_checkout(src)
    venv = tmp / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)],
                   check=True)
    python = venv / 'bin' / 'python'
    purelib = 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
    site = Path(subprocess.check_output([str(python), '-c', purelib],
                                        text=True).strip())
    base_sites = sorted({sysconfig.get_paths()['purelib'],
                         sysconfig.get_paths()['platlib']})
    (site / 'base_environment.pth').write_text(''.join(f'{p}\n' for p in base_sites))

    def snapshot():
        return json.loads(subprocess.check_output(
            [str(python), '-c', SNAPSHOT, *STACK], text=True))

    before, site_before = snapshot(), sorted(os.listdir(site))
    # no index, no build isolation: pip may only use what is installed (pip and
    # setuptools too come from the environment)
    pip = subprocess.run(
        [str(python), '-m', 'pip', 'install', '--no-index', '--no-build-isolation',
         '--disable-pip-version-check', str(src)],
        cwd=tmp, capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    return dict(python=python, site=site, src=src, tmp=tmp, pip=pip.stdout + pip.stderr,
                before=before, after=snapshot(), base_sites=base_sites,
                site_before=site_before, site_after=sorted(os.listdir(site)))


@pytest.mark.slow
def test_pip_install_keeps_the_mmdetection_stack(installed):
    before, after = installed['before'], installed['after']
    assert after == before  # versions, locations, files: untouched
    for name in STACK:  # and they are this environment's, not the new venv's
        assert before[name]['location'] in installed['base_sites']
    # the new venv got mmdet_moe alone
    added = set(installed['site_after']) - set(installed['site_before'])
    assert {re.sub(r'-[^-]*\.dist-info$', '', name) for name in added} == {'mmdet_moe'}
    assert len(added) == 2, added
    log = installed['pip']
    for name in STACK:
        assert re.search(rf'^Requirement already satisfied: {name}\b', log, re.M), log
        assert not re.search(rf'^(Collecting|Downloading|Building wheel for) {name}\b',
                             log, re.M | re.I), log
    assert re.search(r'^Successfully installed mmdet[-_]moe-\S+$', log, re.M), log


@pytest.mark.slow
def test_installed_package_ships_configs(installed):
    package = installed['site'] / 'mmdet_moe'
    mim = package / '.mim'
    assert not (mim / 'configs').is_symlink()
    assert (mim / 'model-index.yml').read_text() == 'Import: []\n'
    shipped = {p.relative_to(mim / 'configs') for p in (mim / 'configs').rglob('*.py')}
    source = {p.relative_to(installed['src'] / 'configs')
              for p in (installed['src'] / 'configs').rglob('*.py')}
    assert shipped == source and Path(TOY) in shipped
    # ranges, not pins, in the installed metadata
    requires = subprocess.check_output(
        [str(installed['python']), '-c',
         'import importlib.metadata as m; print("\\n".join(m.requires("mmdet_moe")))'],
        cwd=installed['tmp'], text=True).splitlines()
    stack = {re.match(r'[\w-]+', r).group(): r for r in requires
             if re.match(r'[\w-]+', r).group() in STACK}
    assert set(stack) == set(STACK)
    assert not any('==' in r for r in stack.values()), stack


@pytest.mark.slow
def test_user_config_inherits_from_installed_package(installed):
    user = installed['tmp'] / 'my_project'
    result = run_check(installed['python'], user)
    check_result(result, installed['site'] / 'mmdet_moe')
    for text in (result['text'], result['coco_text']):  # not from a checkout
        for checkout in (ROOT, installed['src']):
            assert f'{checkout / "configs"}/' not in text
            assert f'{checkout / "mmdet_moe"}/' not in text


@pytest.mark.slow
def test_user_config_inherits_in_this_environment(tmp_path):
    """The same with the package as imported here (the editable install of the
    checkout: its configs/ through mmdet_moe/.mim/configs)."""
    import mmdet_moe
    package = Path(mmdet_moe.__file__).parent
    result = run_check(sys.executable, tmp_path / 'my_project')
    check_result(result, package)
    if package == ROOT / 'mmdet_moe':  # the editable install: the checkout's configs
        base = package / '.mim' / 'configs' / TOY
        assert base.resolve() == (ROOT / 'configs' / TOY).resolve()


def test_import_registers_the_config_package():
    import mmdet_moe
    from mmengine.config.utils import MODULE2PACKAGE
    from mmengine.utils import get_installed_path
    from mmdet_moe.registry import CONFIG_PACKAGE, register_config_package
    assert MODULE2PACKAGE['mmdet_moe'] == CONFIG_PACKAGE == 'mmdet_moe.registry'
    entries = dict(MODULE2PACKAGE)
    register_config_package()
    register_config_package()
    assert dict(MODULE2PACKAGE) == entries
    # what mmengine computes for `mmdet_moe::`: the imported package's folder
    package = osp.dirname(mmdet_moe.__file__)
    assert get_installed_path(MODULE2PACKAGE['mmdet_moe']) == package
    assert osp.isfile(osp.join(package, '.mim', 'configs', TOY))


def test_scope_mmdet_moe_finds_what_mmdet_finds():
    import mmdet.registry
    import mmdet_moe.registry
    from mmdet.registry import HOOKS, METRICS, MODELS
    from mmengine.registry import Registry
    children = {name: reg for name, reg in vars(mmdet_moe.registry).items()
                if isinstance(reg, Registry)}
    parents = {name: reg for name, reg in vars(mmdet.registry).items()
               if isinstance(reg, Registry) and reg.scope == 'mmdet'}
    assert set(children) == set(parents)
    for name, child in children.items():
        assert child.scope == 'mmdet_moe' and child.parent is parents[name]
    assert mmdet_moe.registry.MODELS.get('MoERetinaNet') is MODELS.get('MoERetinaNet')
    assert mmdet_moe.registry.MODELS.get('RetinaNet') is MODELS.get('RetinaNet')
    assert mmdet_moe.registry.HOOKS.get('ExpertSizeStatsHook') is \
        HOOKS.get('ExpertSizeStatsHook')
    assert mmdet_moe.registry.METRICS.get('CocoMetric') is METRICS.get('CocoMetric')
    assert MODELS.get('mmdet_moe.MoEFPN') is MODELS.get('MoEFPN')
    # made once: importing the module again keeps the same registries
    importlib.reload(mmdet_moe.registry)
    assert mmdet_moe.registry.MODELS is children['MODELS']


def test_constraints_satisfy_the_requirements():
    """The tested versions (requirements/constraints.txt) are inside setup.py's
    ranges."""
    from packaging.requirements import Requirement
    from packaging.version import Version
    pins = {}
    for line in (ROOT / 'requirements' / 'constraints.txt').read_text().splitlines():
        line = line.split('#')[0].strip()
        if line:
            name, version = line.split('==')
            pins[name.lower()] = Version(version)
    text = (ROOT / 'setup.py').read_text()
    block = re.search(r'install_requires=\[(.*?)\]', text, re.S).group(1)
    requirements = [Requirement(r) for r in re.findall(r"'([^']+)'", block)]
    assert {r.name for r in requirements} >= set(STACK)
    for requirement in requirements:
        assert requirement.name in pins, requirement
        assert requirement.specifier.contains(pins[requirement.name],
                                              prereleases=True), requirement
