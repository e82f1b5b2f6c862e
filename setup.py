"""Packaging for mmdet-moe, an MMDetection 3.x plugin for Mixture-of-Experts layers.

The requirements are ranges (what mmdet 3.x itself accepts), so that installing into
an existing MMDetection environment keeps its torch, mmcv, mmengine and mmdet; the
versions this project is tested with are in requirements/constraints.txt, which
tools/setup_env.sh passes to pip with ``-c``.

The provided configs ship inside the package, as mmdet's do: ``configs/`` becomes
``mmdet_moe/.mim/configs`` (with an empty ``model-index.yml``, which mmengine reads
first), so that ``_base_ = 'mmdet_moe::toy/...py'`` resolves from the installed
package (see mmdet_moe/registry.py). A wheel gets a copy (``build_py``); an editable
install (``pip install -e .``) gets, in the checkout, ``mmdet_moe/.mim/`` with a link
``configs -> ../../configs`` and a ``.gitignore`` that keeps the folder out of git.
"""
import os
import os.path as osp
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.develop import develop
except ImportError:  # a setuptools without the legacy `develop` command
    develop = None

ROOT = osp.dirname(osp.abspath(__file__))
CONFIGS = osp.join(ROOT, 'configs')
# mmengine looks a `pkg::` path up in <pkg>/.mim/model-index.yml before it takes it
# as a file under .mim/configs; this package lists no model zoo there
MODEL_INDEX = 'Import: []\n'


def read_version():
    namespace = {}
    with open(osp.join(osp.dirname(__file__), 'mmdet_moe', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


def check_configs():
    if not osp.isdir(CONFIGS):
        raise FileNotFoundError(f'{CONFIGS} is missing: the provided configs are '
                                'part of the package (mmdet_moe/.mim/configs)')


def write_mim_in_build(build_lib):
    """A copy of configs/ and model-index.yml in <build_lib>/mmdet_moe/.mim (wheel)."""
    check_configs()
    mim = osp.join(build_lib, 'mmdet_moe', '.mim')
    shutil.rmtree(mim, ignore_errors=True)  # no config deleted since a previous build
    shutil.copytree(CONFIGS, osp.join(mim, 'configs'),
                    ignore=shutil.ignore_patterns('__pycache__', '*.py[cod]'))
    with open(osp.join(mim, 'model-index.yml'), 'w') as f:
        f.write(MODEL_INDEX)


def link_mim_in_checkout():
    """mmdet_moe/.mim in the checkout for an editable install: a link to configs/,
    model-index.yml and a .gitignore that ignores the folder (idempotent)."""
    check_configs()
    mim = osp.join(ROOT, 'mmdet_moe', '.mim')
    os.makedirs(mim, exist_ok=True)
    for name, text in (('.gitignore', '# made by setup.py (editable install)\n*\n'),
                       ('model-index.yml', MODEL_INDEX)):
        with open(osp.join(mim, name), 'w') as f:
            f.write(text)
    link, target = osp.join(mim, 'configs'), osp.join('..', '..', 'configs')
    if osp.islink(link) and os.readlink(link) == target:
        return
    if osp.islink(link) or osp.isfile(link):
        os.remove(link)
    elif osp.isdir(link):
        shutil.rmtree(link)
    try:
        os.symlink(target, link, target_is_directory=True)
    except OSError:  # no symlinks (e.g. Windows without the privilege): a copy
        shutil.copytree(CONFIGS, link)


class BuildPy(build_py):
    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):  # PEP 660: files stay in the checkout
            link_mim_in_checkout()
        else:
            write_mim_in_build(self.build_lib)


CMDCLASS = {'build_py': BuildPy}
if develop is not None:
    class Develop(develop):  # `setup.py develop`
        def run(self):
            super().run()
            link_mim_in_checkout()

    CMDCLASS['develop'] = Develop


setup(
    name='mmdet_moe',
    version=read_version(),
    description='Sparsely-gated Mixture-of-Experts layers for MMDetection '
    'detectors, with per-expert object-size analysis',
    long_description=open('README.md').read() if osp.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmdet_moe', 'mmdet_moe.*']),
    python_requires='>=3.11',
    # ranges, not pins: mmdet 3.3.0 accepts mmcv >=2.0.0rc4,<2.2.0 and mmengine
    # >=0.7.1,<1.0.0 (its mmdet/__init__.py asserts, its 'mim' extra); mmdet itself
    # lists neither in its requirements, so they are named here. mmdet is held to the
    # minor version the tests run against (detection tagging follows mmdet's decode
    # code); mmdet_moe/compat.py checks it at import
    install_requires=[
        'torch>=2.0',
        'mmdet>=3.3.0,<3.4.0',
        'mmengine>=0.7.1,<1.0.0',
        'mmcv>=2.0.0rc4,<2.2.0',
        'pycocotools',
        'matplotlib',
        'entmax',
    ],
    extras_require={
        'tests': ['pytest'],
        # what mmdet's stock tools/analysis_tools/*.py import beyond mmdet's own
        # requirements: seaborn (analyze_logs.py; mmdet lists it in its 'tracking'
        # extra), psutil (benchmark.py through mmdet.utils.benchmark; mmdet's 'tests'),
        # scikit-learn (PAAHead's training and the tracking interpolation import it)
        'tools': ['seaborn>=0.12,<0.14', 'psutil>=5.8,<8', 'scikit-learn>=1.0,<2'],
        # tools/export_onnx.py: torch's TorchScript exporter needs onnx; --verify and
        # the export tests run the file with onnxruntime
        'export': ['onnx>=1.14,<2', 'onnxruntime>=1.16,<2'],
        # the documentation site (make docs, tests/test_docs.py): mkdocs >= 1.6 checks
        # links and anchors between pages (mkdocs.yml's validation)
        'docs': ['mkdocs>=1.6,<2'],
    },
    license='Apache-2.0',
    cmdclass=CMDCLASS,
    zip_safe=False,
)
