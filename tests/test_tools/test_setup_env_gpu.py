"""tools/setup_env.sh on a GPU machine: tools/mmcv_build_plan.py's decision (CUDA ops
for a CUDA build of torch, nvcc, FORCE_CUDA, the wheel cache's keys) on faked facts,
its probes on fakes and on this environment, and setup_env.sh's mmcv step run against
this venv through an interpreter that refuses pip (nothing is installed or built)."""
import json
import os
import os.path as osp
import stat
import subprocess
import sys

import pytest
from helpers import ROOT, TOOLS, load_tool

pytestmark = pytest.mark.slow

MMCV = '2.1.0'
PLAN = osp.join(TOOLS, 'mmcv_build_plan.py')
TORCH_ARCHS = ['sm_50', 'sm_60', 'sm_70', 'sm_75', 'sm_80', 'sm_86', 'sm_90', 'sm_90a']
NVCC_ARCHS = ['5.0', '5.2', '6.0', '6.1', '7.0', '7.5', '8.0', '8.6', '8.9', '9.0']


@pytest.fixture(scope='module')
def tool():
    return load_tool('mmcv_build_plan.py')


def cpu_facts(**changes):
    facts = dict(python='cp311', torch='2.13.0+cpu', torch_cuda=None, torch_hip=None,
                 torch_archs=[], gpu_capabilities=[], cuda_home=None, cuda_home_from=None,
                 mmcv_dist=None, mmcv=None, mmcv_ops=None, mmcv_error=None)
    facts.update(changes)
    return facts


def cuda_facts(**changes):
    facts = cpu_facts(torch='2.13.0+cu121', torch_cuda='12.1', torch_archs=TORCH_ARCHS,
                      cuda_home='/usr/local/cuda-12.1', cuda_home_from='CUDA_HOME',
                      nvcc='/usr/local/cuda-12.1/bin/nvcc', nvcc_version='12.1',
                      nvcc_archs=NVCC_ARCHS, cuda_headers=True)
    facts.update(changes)
    return facts


NO_NVCC = dict(cuda_home=None, cuda_home_from=None, nvcc=None, nvcc_version=None,
               nvcc_archs=None, cuda_headers=False)
TORCH_ARCH_LIST = '5.0;6.0;7.0;7.5;8.0;8.6;9.0+PTX'  # from TORCH_ARCHS, sm_90a left out


def put_wheel(wheels, key):
    folder = osp.join(wheels, key)
    os.makedirs(folder, exist_ok=True)
    path = osp.join(folder, f'mmcv-{MMCV}-cp311-cp311-linux_x86_64.whl')
    open(path, 'w').close()
    return path


def run_plan(facts, tmp_path, env=None):
    """The command line as setup_env.sh calls it, on faked facts."""
    facts_file = tmp_path / 'facts.json'
    facts_file.write_text(json.dumps(facts))
    environ = {k: v for k, v in os.environ.items()
               if k not in ('FORCE_CUDA', 'MAX_JOBS', 'TORCH_CUDA_ARCH_LIST')}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, PLAN, '--mmcv-version', MMCV,
         '--wheels', str(tmp_path / 'wheels'), '--facts', str(facts_file)],
        env=environ, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ CPU torch


def test_cpu_torch_builds_as_before(tool, tmp_path):
    plan = tool.plan(cpu_facts(), {}, MMCV, str(tmp_path))
    assert plan['action'] == 'build' and plan['flavour'] == 'cpu'
    assert plan['key'] == 'cp311-torch2.13.0+cpu'  # the cache's folder, unchanged
    assert plan['wheels'] == osp.join(str(tmp_path), 'cp311-torch2.13.0+cpu')
    assert plan['build_env'] == dict(MMCV_WITH_OPS='1', FORCE_CUDA='0', MAX_JOBS='2')
    assert plan['build_time'] == 'about 17 min on 2 cores'
    assert plan['pip_flags'] == [] and not plan['notes'] and not plan['warnings']
    # the caller's FORCE_CUDA and MAX_JOBS as before (${FORCE_CUDA:-0}, ${MAX_JOBS:-2})
    plan = tool.plan(cpu_facts(), dict(FORCE_CUDA='', MAX_JOBS='6'), MMCV, str(tmp_path))
    assert plan['build_env'] == dict(MMCV_WITH_OPS='1', FORCE_CUDA='0', MAX_JOBS='6')


def test_cpu_torch_finds_the_existing_cache(tool, tmp_path):
    wheel = put_wheel(tmp_path, 'cp311-torch2.13.0+cpu')
    plan = tool.plan(cpu_facts(), {}, MMCV, str(tmp_path))
    assert plan['action'] == 'install' and plan['wheel'] == wheel


def test_installed_mmcv_kept_or_replaced(tool, tmp_path):
    installed = dict(mmcv_dist=MMCV, mmcv=MMCV, mmcv_ops='not available')
    assert tool.plan(cpu_facts(**installed), {}, MMCV, str(tmp_path))['action'] == 'keep'
    # ops that do not import (built against another torch): rebuilt, and pip told to
    # replace the installed mmcv of the same version
    broken = dict(mmcv_dist=MMCV, mmcv=MMCV, mmcv_ops=None,
                  mmcv_error="ImportError: undefined symbol")
    plan = tool.plan(cpu_facts(**broken), {}, MMCV, str(tmp_path))
    assert plan['action'] == 'build'
    assert plan['pip_flags'] == ['--force-reinstall', '--no-deps']
    other = dict(mmcv_dist='2.2.0', mmcv='2.2.0', mmcv_ops='not available')
    plan = tool.plan(cpu_facts(**other), {}, MMCV, str(tmp_path))
    assert plan['action'] == 'build' and plan['pip_flags'] == []


def test_cpu_torch_refuses_force_cuda_1(tool, tmp_path):
    with pytest.raises(tool.PlanError, match='CPU build'):
        tool.plan(cpu_facts(), dict(FORCE_CUDA='1'), MMCV, str(tmp_path))


# ------------------------------------------------------------------ CUDA torch


def test_cuda_torch_with_nvcc_builds_cuda_ops(tool, tmp_path):
    plan = tool.plan(cuda_facts(), {}, MMCV, str(tmp_path), cpus=16)
    assert plan['action'] == 'build' and plan['flavour'] == 'cuda'
    assert plan['build_env'] == dict(
        MMCV_WITH_OPS='1', FORCE_CUDA='1', MAX_JOBS='8',  # capped: nvcc's memory
        TORCH_CUDA_ARCH_LIST=TORCH_ARCH_LIST, CUDA_HOME='/usr/local/cuda-12.1')
    assert plan['key'] == ('cp311-torch2.13.0+cu121-cuda12.1-'
                           'arch5.0_6.0_7.0_7.5_8.0_8.6_9.0+PTX')
    assert 'MAX_JOBS=8' in plan['build_time'] and not plan['warnings']
    assert any('FORCE_CUDA=1' in n for n in plan['notes'])
    assert any('/usr/local/cuda-12.1/bin/nvcc' in n for n in plan['notes'])
    # the caller's choices win
    env = dict(FORCE_CUDA='1', MAX_JOBS='3', TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX')
    plan = tool.plan(cuda_facts(), env, MMCV, str(tmp_path), cpus=16)
    assert plan['build_env']['MAX_JOBS'] == '3'
    assert plan['build_env']['TORCH_CUDA_ARCH_LIST'] == '8.0;9.0+PTX'
    assert plan['key'].endswith('-cuda12.1-arch8.0_9.0+PTX')


def test_arch_list_of_visible_gpus(tool, tmp_path):
    facts = cuda_facts(gpu_capabilities=[[9, 0], [8, 0], [9, 0]])
    plan = tool.plan(facts, {}, MMCV, str(tmp_path), cpus=2)
    assert plan['build_env']['TORCH_CUDA_ARCH_LIST'] == '8.0;9.0+PTX'
    assert plan['build_env']['MAX_JOBS'] == '2'
    # 'native' means the visible GPUs to torch, too; a GPU newer than torch knows is
    # clamped to torch's newest arch, as torch's builder does
    facts = cuda_facts(gpu_capabilities=[[12, 0]])
    plan = tool.plan(facts, dict(TORCH_CUDA_ARCH_LIST='native'), MMCV, str(tmp_path))
    assert plan['build_env']['TORCH_CUDA_ARCH_LIST'] == '9.0+PTX'


def test_cuda_torch_without_nvcc_stops_with_what_to_install(tool, tmp_path):
    with pytest.raises(tool.PlanError) as e:
        tool.plan(cuda_facts(**NO_NVCC), {}, MMCV, str(tmp_path))
    message = str(e.value)
    for words in ('torch.version.cuda = 12.1', 'CUDA toolkit 12.1', 'nvcc', 'CUDA_HOME',
                  'FORCE_CUDA=0'):
        assert words in message
    # the command line: exit 2, the message on stderr, nothing for setup_env.sh to eval
    proc = run_plan(cuda_facts(**NO_NVCC), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ''
    assert proc.stderr.startswith('[setup] ERROR: torch 2.13.0+cu121 is a CUDA build')
    assert 'Install the CUDA toolkit 12.1' in proc.stderr


@pytest.mark.parametrize('changes, words', [
    (dict(nvcc=None), 'has no bin/nvcc'),
    (dict(cuda_headers=False), 'has no include/cuda_runtime.h'),
    (dict(nvcc_version='11.8'), 'refuses another major version'),
    (dict(nvcc_archs=['5.0', '6.0', '7.0', '7.5', '8.0']),
     'cannot compile for 8.6, 9.0 '),
])
def test_unusable_toolkits(tool, tmp_path, changes, words):
    with pytest.raises(tool.PlanError, match=words):
        tool.plan(cuda_facts(**changes), {}, MMCV, str(tmp_path))


def test_minor_cuda_mismatch_warns(tool, tmp_path):
    plan = tool.plan(cuda_facts(nvcc_version='12.4'), {}, MMCV, str(tmp_path))
    assert plan['action'] == 'build'
    assert plan['warnings'] == ['nvcc is CUDA 12.4, torch was built with 12.1 '
                                "(same major: torch's builder accepts it)"]


def test_explicit_force_cuda_0_accepts_cpu_ops(tool, tmp_path):
    plan = tool.plan(cuda_facts(**NO_NVCC), dict(FORCE_CUDA='0'), MMCV, str(tmp_path))
    assert plan['action'] == 'build' and plan['flavour'] == 'cpu-ops'
    # the GPUs hidden from the build: mmcv's setup.py compiles CUDA ops when it sees one
    assert plan['build_env'] == dict(MMCV_WITH_OPS='1', FORCE_CUDA='0', MAX_JOBS='2',
                                     CUDA_VISIBLE_DEVICES='')
    assert plan['key'] == 'cp311-torch2.13.0+cu121-cpu-ops'
    assert len(plan['warnings']) == 1 and 'without CUDA ops' in plan['warnings'][0]
    proc = run_plan(cuda_facts(**NO_NVCC), tmp_path, env=dict(FORCE_CUDA='0'))
    assert proc.returncode == 0, proc.stderr
    assert '[setup]   WARNING: FORCE_CUDA=0 with torch 2.13.0+cu121' in proc.stderr
    with pytest.raises(tool.PlanError, match="FORCE_CUDA='yes'"):
        tool.plan(cuda_facts(), dict(FORCE_CUDA='yes'), MMCV, str(tmp_path))


def test_cache_keys_never_mix_cpu_and_cuda_builds(tool, tmp_path):
    # PyPI's Linux torch is a CUDA build without a local version: same version string
    # as a CPU build of it would have
    cpu = tool.plan(cpu_facts(torch='2.13.0'), {}, MMCV, str(tmp_path))
    cuda = tool.plan(cuda_facts(torch='2.13.0'), {}, MMCV, str(tmp_path))
    cpu_ops = tool.plan(cuda_facts(torch='2.13.0'), dict(FORCE_CUDA='0'), MMCV,
                        str(tmp_path))
    other_archs = tool.plan(cuda_facts(torch='2.13.0'), dict(TORCH_CUDA_ARCH_LIST='8.0'),
                            MMCV, str(tmp_path))
    keys = [p['key'] for p in (cpu, cuda, cpu_ops, other_archs)]
    assert len(set(keys)) == 4, keys
    assert cpu['key'] == 'cp311-torch2.13.0'
    # a CPU-ops wheel in the CPU key's folder is not installed for a CUDA torch
    put_wheel(tmp_path, cpu['key'])
    put_wheel(tmp_path, cpu_ops['key'])
    plan = tool.plan(cuda_facts(torch='2.13.0'), {}, MMCV, str(tmp_path))
    assert plan['action'] == 'build'
    wheel = put_wheel(tmp_path, cuda['key'])
    plan = tool.plan(cuda_facts(torch='2.13.0', **NO_NVCC), {}, MMCV, str(tmp_path))
    # a cached CUDA wheel needs no nvcc to install
    assert plan['action'] == 'install' and plan['wheel'] == wheel


def test_installed_mmcv_without_cuda_ops_is_replaced(tool, tmp_path):
    cpu_ops = dict(mmcv_dist=MMCV, mmcv=MMCV, mmcv_ops='not available')
    plan = tool.plan(cuda_facts(**cpu_ops), {}, MMCV, str(tmp_path))
    assert plan['action'] == 'build'
    assert plan['pip_flags'] == ['--force-reinstall', '--no-deps']
    assert any('has no CUDA ops' in n for n in plan['notes'])
    with pytest.raises(tool.PlanError, match='CUDA toolkit 12.1'):
        tool.plan(cuda_facts(**cpu_ops, **NO_NVCC), {}, MMCV, str(tmp_path))
    # one with CUDA ops is kept, without nvcc; FORCE_CUDA=0 keeps either
    with_cuda = dict(cpu_ops, mmcv_ops='12.1')
    plan = tool.plan(cuda_facts(**with_cuda, **NO_NVCC), {}, MMCV, str(tmp_path))
    assert plan['action'] == 'keep' and plan['notes'] == [
        f'mmcv {MMCV} has its CUDA ops (CUDA 12.1): kept']
    for ops in (cpu_ops, with_cuda):
        plan = tool.plan(cuda_facts(**ops, **NO_NVCC), dict(FORCE_CUDA='0'), MMCV,
                         str(tmp_path))
        assert plan['action'] == 'keep'


def test_shell_assignments_eval_in_bash(tool, tmp_path):
    wheels = tmp_path / 'wheels with space'
    plan = tool.plan(cuda_facts(**NO_NVCC), dict(FORCE_CUDA='0'), MMCV, str(wheels))
    script = (tool.shell_assignments(plan) + '\nprintf "<%s>\\n" "$MMCV_ACTION" '
              '"$MMCV_WHEELS" "${MMCV_BUILD_ENV[@]}" "${#MMCV_PIP_FLAGS[@]}"')
    out = subprocess.run(['bash', '-euc', script], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ['<build>', f'<{wheels}/cp311-torch2.13.0+cu121-cpu-ops>',
                   '<MMCV_WITH_OPS=1>', '<FORCE_CUDA=0>', '<MAX_JOBS=2>',
                   '<CUDA_VISIBLE_DEVICES=>', '<0>']


# ------------------------------------------------------------------ the probes


def test_find_cuda_home_in_torchs_order(tool):
    def which(name):
        return '/opt/cuda-12.1/bin/nvcc'

    def no_nvcc(name):
        return None

    env = dict(CUDA_HOME='/a', CUDA_PATH='/b')
    assert tool.find_cuda_home(env, which) == ('/a', 'CUDA_HOME')
    assert tool.find_cuda_home(dict(CUDA_PATH='/b'), which) == ('/b', 'CUDA_PATH')
    assert tool.find_cuda_home({}, which) == ('/opt/cuda-12.1',
                                              'nvcc on PATH (/opt/cuda-12.1/bin/nvcc)')
    assert tool.find_cuda_home({}, no_nvcc, lambda p: True) == ('/usr/local/cuda',
                                                                '/usr/local/cuda')
    assert tool.find_cuda_home({}, no_nvcc, lambda p: False) == (None, None)


def test_nvcc_facts_from_a_fake_toolkit(tool, tmp_path):
    home = tmp_path / 'cuda-12.1'
    (home / 'bin').mkdir(parents=True)
    (home / 'include').mkdir()
    nvcc = home / 'bin' / 'nvcc'
    nvcc.write_text(
        '#!/bin/sh\n'
        'if [ "$1" = --list-gpu-arch ]; then\n'
        '  printf "compute_50\\ncompute_80\\ncompute_90\\ncompute_90a\\ncompute_100\\n"\n'
        'else\n'
        '  echo "nvcc: NVIDIA (R) Cuda compiler driver"\n'
        '  echo "Cuda compilation tools, release 12.1, V12.1.105"\n'
        'fi\n')
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    facts = tool.nvcc_facts(str(home))
    assert facts == dict(nvcc=str(nvcc), nvcc_version='12.1', cuda_headers=False,
                         nvcc_archs=['5.0', '8.0', '9.0', '10.0'])
    (home / 'include' / 'cuda_runtime.h').write_text('')
    assert tool.nvcc_facts(str(home))['cuda_headers'] is True
    assert tool.nvcc_facts(str(tmp_path / 'nowhere'))['nvcc'] is None
    assert tool.nvcc_facts(None)['nvcc'] is None


def test_probe_of_this_environment(tool, tmp_path):
    import mmcv
    import torch
    facts = tool.probe()
    assert facts['torch'] == torch.__version__
    assert facts['torch_cuda'] == torch.version.cuda
    assert facts['mmcv'] == facts['mmcv_dist'] == mmcv.__version__
    from mmcv.ops import get_compiling_cuda_version
    assert facts['mmcv_ops'] == get_compiling_cuda_version()
    plan = tool.plan(facts, {}, mmcv.__version__, str(tmp_path))
    assert plan['action'] == 'keep'  # the set-up made this environment
    if torch.version.cuda is None:
        assert facts['mmcv_ops'] == 'not available'  # the marker of a CPU-ops build
        assert tool.plan(dict(facts, mmcv=None), {}, mmcv.__version__,
                         str(tmp_path))['key'] == (
            f'cp{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}')


# ------------------------------------------------------------------ setup_env.sh


# setup_env.sh's steps before mmcv's are no-ops only in an environment it made
made_by_setup_env = pytest.mark.skipif(
    not osp.exists(osp.join(sys.prefix, '.mmdet_moe-installed')),
    reason='this environment was not made by tools/setup_env.sh')


def fake_venv(tmp_path, facts=None):
    """A VENV whose python is this one, refusing pip (so nothing can be installed)
    and, with ``facts``, giving mmcv_build_plan.py those facts."""
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    python = venv / 'bin' / 'python'
    facts_opt = ''
    if facts is not None:
        (tmp_path / 'facts.json').write_text(json.dumps(facts))
        facts_opt = f' --facts {tmp_path / "facts.json"}'
    python.write_text(
        '#!/bin/bash\n'
        'if [ "$1 $2" = "-m pip" ]; then echo "[fake python] pip refused: $*" >&2; '
        'exit 97; fi\n'
        f'case "$1" in */mmcv_build_plan.py) '
        f'exec {sys.executable} "$@"{facts_opt};; esac\n'
        f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    (venv / '.mmdet_moe-installed').touch()  # newer than setup.py and the constraints
    return venv


def run_setup(venv, tmp_path, **env):
    environ = {k: v for k, v in os.environ.items()
               if k not in ('FORCE_CUDA', 'MAX_JOBS', 'TORCH_CUDA_ARCH_LIST',
                            'TORCH_INDEX_URL', 'TORCH_SPEC')}
    environ.update(VENV=str(venv), PYTHON=str(venv / 'bin' / 'python'),
                   MMDET_MOE_CACHE=str(tmp_path / 'cache'), **env)
    return subprocess.run(['bash', osp.join(TOOLS, 'setup_env.sh')], cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=300)


@made_by_setup_env
def test_setup_env_is_a_no_op_here(tmp_path):
    import torch
    venv = fake_venv(tmp_path)
    proc = run_setup(venv, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'pip refused' not in proc.stderr
    steps = [line for line in proc.stdout.splitlines()
             if line.startswith('[setup] ') and not line.startswith('[setup]  ')]
    assert steps == [
        f'[setup] checking the Python interpreter ({venv}/bin/python)',
        '[setup] build tools (setuptools >=77.0.3,<81: mmcv\'s setup.py imports '
        'pkg_resources)',
        '[setup] torch (kept if already installed, else torch==2.13.0)',
        f'[setup] mmcv {MMCV} with compiled ops',
        '[setup] mmengine, mmdet, pycocotools and mmdet_moe (editable, with the tests, '
        'tools, export and docs extras)',
        '[setup] checking the stack',
        f'[setup] done: {venv}']
    tag = f'cp{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}'
    assert f'[setup]   using {tag}\n[setup] mmcv {MMCV} with compiled ops\n' \
           '[setup] mmengine' in proc.stdout  # nothing in between: mmcv kept silently
    assert ('[setup]   CUDA:' in proc.stdout) == (torch.version.cuda is not None)


@made_by_setup_env
def test_setup_env_stops_on_cuda_torch_without_nvcc(tmp_path):
    venv = fake_venv(tmp_path, cuda_facts(**NO_NVCC))
    proc = run_setup(venv, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert '[setup] ERROR: torch 2.13.0+cu121 is a CUDA build' in proc.stderr
    failed = f'[setup] FAILED at step: mmcv {MMCV} with compiled ops (exit 2)'
    assert failed in proc.stderr
    assert 'pip refused' not in proc.stderr
    assert not osp.exists(tmp_path / 'cache')
