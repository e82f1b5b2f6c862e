"""Packaging for mmdet-moe, an MMDetection 3.x plugin for Mixture-of-Experts layers."""
import os.path as osp

from setuptools import find_packages, setup


def read_version():
    namespace = {}
    with open(osp.join(osp.dirname(__file__), 'mmdet_moe', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


setup(
    name='mmdet_moe',
    version=read_version(),
    description='Sparsely-gated Mixture-of-Experts layers for MMDetection '
    'detectors, with per-expert object-size analysis',
    long_description=open('README.md').read() if osp.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmdet_moe', 'mmdet_moe.*']),
    python_requires='>=3.11',
    install_requires=[
        'torch>=2.0',
        'mmdet==3.3.0',
        'mmengine==0.10.7',
        'mmcv==2.1.0',
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
    },
    license='Apache-2.0',
    zip_safe=False,
)
