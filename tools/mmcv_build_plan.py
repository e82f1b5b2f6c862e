"""How tools/setup_env.sh gets mmcv's compiled ops: keep the installed mmcv, install a
cached wheel, or build one, with or without mmcv's CUDA ops.

mmcv 2.1.0's setup.py compiles its CUDA ops only when ``torch.cuda.is_available()``
or ``FORCE_CUDA=1``. Where the build cannot see a GPU (a container build, a login
node), a CUDA build of torch would thus get an mmcv without CUDA ops, and mmdet's NMS
fails at the first validation (``nms_impl: implementation for device cuda:0 not
found``). So:

- CPU torch (``torch.version.cuda`` is None): ``FORCE_CUDA=${FORCE_CUDA:-0}``,
  ``MAX_JOBS=${MAX_JOBS:-2}``, wheels cached under ``cp311-torch2.13.0+cpu`` (all
  as before this helper existed).
- CUDA torch: ``FORCE_CUDA=1`` with the ``nvcc`` torch's extension builder will use
  (``CUDA_HOME``/``CUDA_PATH``, else ``nvcc`` on ``PATH``, else ``/usr/local/cuda``,
  the order of ``torch.utils.cpp_extension``), and an explicit
  ``TORCH_CUDA_ARCH_LIST`` (the caller's, else the visible GPUs', else the archs torch
  itself was built for: without a visible GPU and without this variable, torch's
  builder has no arch to compile for). No nvcc: an error naming what to install,
  unless the caller sets ``FORCE_CUDA=0`` (a CPU-ops mmcv, with a warning; the GPUs
  are hidden from the build so that mmcv's setup.py does not compile CUDA ops anyway).
  Wheels are cached under ``cp311-torch<version>-cuda<torch.version.cuda>-arch<archs>``
  (``...-cpu-ops`` for FORCE_CUDA=0), so a CPU-built wheel is never reused for it.
- An installed mmcv is kept when it is the wanted version, its ops import, and, for a
  CUDA plan, they have CUDA: ``mmcv.ops.get_compiling_cuda_version()`` (compiled in;
  no GPU needed) is ``'not available'`` for a build without them.

``plan()`` is the decision, on facts gathered by ``probe()`` (or read from
``--facts FILE``, a JSON of the same keys, to test it without the environment).
Prints shell assignments for setup_env.sh to ``eval`` on stdout, its notes on stderr;
exits 2 with a message when the ops cannot be built as asked.
"""
import argparse
import glob
import json
import os
import os.path as osp
import re
import shlex
import shutil
import subprocess
import sys
import warnings

CPU_MAX_JOBS = '2'  # setup_env.sh's default since its first version
CUDA_MAX_JOBS_CAP = 8  # nvcc needs far more memory per job than g++
CPU_BUILD_TIME = 'about 17 min on 2 cores'
CUDA_BUILD_TIME = ('with its CUDA ops: several times the CPU-only build, more with '
                   'more archs in TORCH_CUDA_ARCH_LIST')


class PlanError(Exception):
    """The ops cannot be built as asked; the message says what to do."""


# ---------------------------------------------------------------- the facts


def find_cuda_home(environ, which=shutil.which, exists=osp.exists):
    """(CUDA_HOME, where it came from), in torch.utils.cpp_extension's order."""
    for var in ('CUDA_HOME', 'CUDA_PATH'):
        if environ.get(var):
            return environ[var], var
    nvcc = which('nvcc')
    if nvcc:
        return osp.dirname(osp.dirname(nvcc)), f'nvcc on PATH ({nvcc})'
    if exists('/usr/local/cuda'):
        return '/usr/local/cuda', '/usr/local/cuda'
    return None, None


def nvcc_facts(cuda_home):
    """nvcc's path, release (e.g. '12.1') and real archs (e.g. ['8.0', '9.0']) under
    cuda_home, and whether the toolkit's headers are there."""
    facts = {'nvcc': None, 'nvcc_version': None, 'nvcc_archs': None,
             'cuda_headers': bool(cuda_home) and
             osp.exists(osp.join(cuda_home, 'include', 'cuda_runtime.h'))}
    nvcc = osp.join(cuda_home, 'bin', 'nvcc') if cuda_home else None
    if not nvcc or not os.access(nvcc, os.X_OK):
        return facts
    facts['nvcc'] = nvcc
    try:
        out = subprocess.run([nvcc, '--version'], capture_output=True, text=True,
                             timeout=60).stdout
        match = re.search(r'release (\d+\.\d+)', out)
        facts['nvcc_version'] = match.group(1) if match else None
        out = subprocess.run([nvcc, '--list-gpu-arch'], capture_output=True, text=True,
                             timeout=60)
        if out.returncode == 0:  # CUDA >= 11
            facts['nvcc_archs'] = sorted(
                {sm_to_arch(int(n)) for n in re.findall(r'compute_(\d+)\b', out.stdout)},
                key=arch_number)
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


def probe(environ=os.environ):
    """The facts plan() decides on, from this interpreter's torch and mmcv."""
    import torch
    facts = {'python': f'cp{sys.version_info[0]}{sys.version_info[1]}',
             'torch': torch.__version__, 'torch_cuda': torch.version.cuda,
             'torch_hip': getattr(torch.version, 'hip', None),
             'torch_archs': [], 'gpu_capabilities': [],
             'cuda_home': None, 'cuda_home_from': None}
    if facts['torch_cuda'] is not None:
        facts['torch_archs'] = torch.cuda.get_arch_list()  # compiled in, no GPU needed
        if torch.cuda.is_available():
            facts['gpu_capabilities'] = [list(torch.cuda.get_device_capability(i))
                                         for i in range(torch.cuda.device_count())]
        facts['cuda_home'], facts['cuda_home_from'] = find_cuda_home(environ)
        facts.update(nvcc_facts(facts['cuda_home']))
    facts.update(mmcv_dist=None, mmcv=None, mmcv_ops=None, mmcv_error=None)
    try:
        from importlib.metadata import PackageNotFoundError, version
        facts['mmcv_dist'] = version('mmcv')  # installed, even where it fails to import
    except PackageNotFoundError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            import mmcv
            facts['mmcv'] = mmcv.__version__
            from mmcv.ops import get_compiling_cuda_version
            facts['mmcv_ops'] = get_compiling_cuda_version()  # 'not available': no CUDA
    except Exception as e:  # absent, or compiled against another torch
        facts['mmcv_error'] = f'{type(e).__name__}: {e}'
    return facts


# ---------------------------------------------------------------- the decision


def sm_to_arch(n):
    return f'{n // 10}.{n % 10}'


def arch_number(arch):
    major, minor = arch.split('.')
    return int(major), int(minor)


def with_ptx(archs):
    """'8.0;8.6;9.0+PTX' from ['8.0', '8.6', '9.0'] (as torch's builder does)."""
    return ';'.join(archs[:-1] + [archs[-1] + '+PTX'])


def torch_built_archs(torch_archs):
    """['5.0', ..., '9.0'] from torch.cuda.get_arch_list()'s 'sm_50', ... (the
    arch-specific 'sm_90a' and the 'compute_' entries left out)."""
    nums = {int(m.group(1)) for a in torch_archs
            for m in [re.fullmatch(r'sm_(\d+)', a)] if m}
    return [sm_to_arch(n) for n in sorted(nums)]


def cuda_arch_list(facts, environ):
    """(TORCH_CUDA_ARCH_LIST for the build, where it came from)."""
    given = environ.get('TORCH_CUDA_ARCH_LIST', '').strip()
    if given and given != 'native':
        return given, 'TORCH_CUDA_ARCH_LIST'
    built = torch_built_archs(facts.get('torch_archs') or [])
    if facts.get('gpu_capabilities'):
        # as torch's builder: the visible GPUs, clamped to the newest arch torch knows
        top = max(map(arch_number, built)) if built else None
        caps = {tuple(c) if top is None else min(tuple(c), top)
                for c in facts['gpu_capabilities']}
        return with_ptx([f'{a}.{b}' for a, b in sorted(caps)]), 'the visible GPUs'
    if built:
        return with_ptx(built), "the archs torch was built for: no GPU visible"
    raise PlanError(
        f"no GPU is visible and torch {facts['torch']} names no arch it was built for: "
        "set TORCH_CUDA_ARCH_LIST to your GPUs' compute capabilities, e.g. "
        "TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX' (A100 and H100)")


def key_part(text):
    return re.sub(r'[^A-Za-z0-9.+_-]', '', re.sub(r'[;,\s]+', '_', text.strip()))


def requested_archs(arch_list):
    """The numeric archs of a TORCH_CUDA_ARCH_LIST ('Ampere' and the like left out)."""
    archs = []
    for entry in re.split(r'[;,\s]+', arch_list):
        entry = entry.replace('+PTX', '')
        if re.fullmatch(r'\d+\.\d+', entry):
            archs.append(entry)
    return archs


def toolkit_needed_message(facts, problem):
    cuda = facts['torch_cuda']
    return (
        f"torch {facts['torch']} is a CUDA build (torch.version.cuda = {cuda}), so mmcv "
        f"is built with its CUDA ops (mmdet's NMS, RoIAlign, ... on GPU tensors), "
        f"which needs nvcc; {problem}.\n"
        f"Install the CUDA toolkit {cuda} (nvcc and the CUDA headers; the major version "
        f"must be torch's {cuda.split('.')[0]}, the same minor avoids a warning), then "
        f"put its bin/ on PATH or set CUDA_HOME to its root, e.g.\n"
        f"    CUDA_HOME=/usr/local/cuda-{cuda} bash tools/setup_env.sh\n"
        f"Or accept mmcv without its CUDA ops (mmdet's NMS then fails on GPU tensors): "
        f"FORCE_CUDA=0 bash tools/setup_env.sh")


def check_toolkit(facts, arch_list):
    """Raise PlanError unless nvcc can build the CUDA ops; return warnings."""
    home, source = facts.get('cuda_home'), facts.get('cuda_home_from')
    if not home:
        raise PlanError(toolkit_needed_message(
            facts, 'none was found (CUDA_HOME and CUDA_PATH unset, no nvcc on PATH, '
                   'no /usr/local/cuda)'))
    if not facts.get('nvcc'):
        raise PlanError(toolkit_needed_message(
            facts, f'CUDA_HOME={home} (from {source}) has no bin/nvcc'))
    if not facts.get('cuda_headers'):
        raise PlanError(toolkit_needed_message(
            facts, f'CUDA_HOME={home} (from {source}) has no include/cuda_runtime.h '
                   '(a wrapper or a symlink of nvcc outside the toolkit? set CUDA_HOME '
                   'to the toolkit root)'))
    nvcc_version = facts.get('nvcc_version')
    if not nvcc_version:
        raise PlanError(toolkit_needed_message(
            facts, f"{facts['nvcc']} --version names no release"))
    torch_cuda = facts['torch_cuda']
    if nvcc_version.split('.')[0] != torch_cuda.split('.')[0]:
        raise PlanError(toolkit_needed_message(
            facts, f"{facts['nvcc']} is CUDA {nvcc_version}: torch's extension builder "
                   f"refuses another major version than torch's"))
    warns = []
    if nvcc_version != torch_cuda:
        warns.append(f"nvcc is CUDA {nvcc_version}, torch was built with {torch_cuda} "
                     "(same major: torch's builder accepts it)")
    supported = facts.get('nvcc_archs')
    if supported:
        missing = [a for a in requested_archs(arch_list) if a not in supported]
        if missing:
            raise PlanError(
                f"nvcc {nvcc_version} ({facts['nvcc']}) cannot compile for "
                f"{', '.join(missing)} of TORCH_CUDA_ARCH_LIST='{arch_list}' (it knows "
                f"{', '.join(supported)}): install the CUDA toolkit {torch_cuda} torch "
                f"was built with, or set TORCH_CUDA_ARCH_LIST to your GPUs' archs only")
    return warns


def plan(facts, environ, mmcv_version, wheels_root, cpus=1):
    """What setup_env.sh does for mmcv.

    Returns a dict: ``action`` ('keep', 'install' a cached wheel, or 'build'),
    ``flavour`` ('cpu': CPU torch; 'cuda': CUDA ops; 'cpu-ops': CUDA torch with
    FORCE_CUDA=0), ``key`` (the cache folder's name) and ``wheels`` (its path), None
    for 'keep', ``wheel`` (the cached wheel to install), ``pip_flags`` (to install a
    wheel over an mmcv of the same version, which pip would keep), ``build_env`` (the
    build's environment variables), ``build_time``, ``notes`` and ``warnings`` (lines
    for the user). Raises PlanError.
    """
    force = environ.get('FORCE_CUDA') or None
    version = facts['torch']
    key = f"{facts['python']}-torch{version}"
    notes, warns, extra_env = [], [], {}
    max_jobs = environ.get('MAX_JOBS') or CPU_MAX_JOBS
    build_time = CPU_BUILD_TIME
    if facts.get('torch_cuda') is None:
        # CPU torch, exactly as before; a ROCm torch (torch.version.hip) too: mmcv's
        # setup.py compiles its HIP ops by itself
        if force == '1' and not facts.get('torch_hip'):
            raise PlanError(
                f"FORCE_CUDA=1 asks for mmcv's CUDA ops, but torch {version} is a CPU "
                "build (torch.version.cuda is None): install a CUDA build of torch "
                "(TORCH_SPEC, TORCH_INDEX_URL; see docs/installation.md, 'On a GPU machine'), "
                "or leave FORCE_CUDA unset")
        flavour, force_cuda = 'cpu', force or '0'
    elif force == '0':
        flavour, force_cuda = 'cpu-ops', '0'
        key += '-cpu-ops'
        extra_env['CUDA_VISIBLE_DEVICES'] = ''  # else mmcv compiles CUDA ops anyway
        warns.append(
            f"FORCE_CUDA=0 with torch {version}, a CUDA build: mmcv without CUDA ops "
            "is accepted (its ops run on CPU tensors only; mmdet's NMS on GPU tensors "
            "fails)")
    elif force == '1' or force is None:
        flavour, force_cuda = 'cuda', '1'
    else:
        raise PlanError(f'FORCE_CUDA={force!r}: set it to 1, 0, or leave it unset')

    # pip keeps an installed mmcv of the same version as a wheel given by path
    pip_flags = (['--force-reinstall', '--no-deps']
                 if facts.get('mmcv_dist') == mmcv_version else [])
    result = dict(action=None, flavour=flavour, key=None, wheels=None, wheel=None,
                  pip_flags=pip_flags, build_env={}, build_time=build_time,
                  notes=notes, warnings=warns)
    installed, ops = facts.get('mmcv'), facts.get('mmcv_ops')
    if installed == mmcv_version and ops is not None:
        if flavour != 'cuda' or ops != 'not available':
            if flavour != 'cpu' and ops != 'not available':
                notes.append(f'mmcv {installed} has its CUDA ops (CUDA {ops}): kept')
            result['action'] = 'keep'
            return result
        notes.append(f"the installed mmcv {installed} has no CUDA ops "
                     "(mmcv.ops.get_compiling_cuda_version() is 'not available'): "
                     "replacing it")

    if flavour == 'cuda':
        arch_list, arch_from = cuda_arch_list(facts, environ)
        key += f"-cuda{facts['torch_cuda']}-arch{key_part(arch_list)}"
        extra_env['TORCH_CUDA_ARCH_LIST'] = arch_list
        max_jobs = environ.get('MAX_JOBS') or str(max(1, min(cpus, CUDA_MAX_JOBS_CAP)))
        result['build_time'] = f'{CUDA_BUILD_TIME}; MAX_JOBS={max_jobs}'
        notes.append(f"torch {version} is a CUDA build (CUDA {facts['torch_cuda']}): "
                     f"mmcv with its CUDA ops, FORCE_CUDA=1, "
                     f"TORCH_CUDA_ARCH_LIST='{arch_list}' ({arch_from})")
    result.update(key=key, wheels=osp.join(wheels_root, key))
    wheels = sorted(glob.glob(osp.join(glob.escape(result['wheels']),
                                       f'mmcv-{mmcv_version}-*.whl')))
    if wheels:
        result.update(action='install', wheel=wheels[0])
        return result
    if flavour == 'cuda':
        warns.extend(check_toolkit(facts, extra_env['TORCH_CUDA_ARCH_LIST']))
        extra_env['CUDA_HOME'] = facts['cuda_home']
        notes.append(f"nvcc: {facts['nvcc']} (CUDA {facts['nvcc_version']}, "
                     f"CUDA_HOME from {facts['cuda_home_from']})")
    result['action'] = 'build'
    result['build_env'] = dict(MMCV_WITH_OPS='1', FORCE_CUDA=force_cuda,
                               MAX_JOBS=max_jobs, **extra_env)
    return result


# ---------------------------------------------------------------- the command


def shell_assignments(result):
    env = [f'{k}={v}' for k, v in result['build_env'].items()]
    return '\n'.join([
        f"MMCV_ACTION={shlex.quote(result['action'])}",
        f"MMCV_FLAVOUR={shlex.quote(result['flavour'])}",
        f"MMCV_WHEELS={shlex.quote(result['wheels'] or '')}",
        f"MMCV_WHEEL={shlex.quote(result['wheel'] or '')}",
        f"MMCV_BUILD_TIME={shlex.quote(result['build_time'])}",
        'MMCV_BUILD_ENV=(' + ' '.join(shlex.quote(e) for e in env) + ')',
        'MMCV_PIP_FLAGS=(' + ' '.join(map(shlex.quote, result['pip_flags'])) + ')',
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--mmcv-version', required=True)
    parser.add_argument('--wheels', required=True,
                        help='the wheel cache (one folder per key)')
    parser.add_argument('--facts', help='JSON of the facts instead of probing (tests)')
    parser.add_argument('--print-facts', action='store_true',
                        help='print the probed facts as JSON and exit')
    args = parser.parse_args(argv)
    if args.facts:
        with open(args.facts) as f:
            facts = json.load(f)
    else:
        facts = probe()
    if args.print_facts:
        print(json.dumps(facts, indent=2))
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    try:
        result = plan(facts, os.environ, args.mmcv_version, args.wheels, cpus)
    except PlanError as e:
        print(f'[setup] ERROR: {e}', file=sys.stderr)
        return 2
    for line in result['notes']:
        print(f'[setup]   {line}', file=sys.stderr)
    for line in result['warnings']:
        print(f'[setup]   WARNING: {line}', file=sys.stderr)
    print(shell_assignments(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
