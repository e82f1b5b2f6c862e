"""atomic_directory: the whole folder or nothing (reports, generated datasets)."""
import pytest

from mmdet_moe.atomic_output import atomic_directory


def test_success_replaces_the_old_folder(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'old.txt').write_text('old')
    with atomic_directory(str(out)) as tmp:
        assert not (tmp_path / 'out' / 'new.txt').exists()
        (tmp_path / tmp / 'new.txt').write_text('new')
    assert sorted(p.name for p in out.iterdir()) == ['new.txt']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_failure_keeps_the_old_folder_and_leaves_no_temporary(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'old.txt').write_text('old')
    with pytest.raises(RuntimeError, match='half way'):
        with atomic_directory(str(out)) as tmp:
            (tmp_path / tmp / 'partial.txt').write_text('x')
            raise RuntimeError('half way')
    assert sorted(p.name for p in out.iterdir()) == ['old.txt']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_the_folder_gets_the_mode_makedirs_gives(tmp_path):
    import os
    umask = os.umask(0o022)
    try:
        with atomic_directory(str(tmp_path / 'out')):
            pass
    finally:
        os.umask(umask)
    assert (tmp_path / 'out').stat().st_mode & 0o777 == 0o755


def test_a_folder_is_replaceable_only_without_inputs_and_other_files(tmp_path):
    from mmdet_moe.atomic_output import check_replaceable
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'epoch_12.pth').write_text('weights')
    check_replaceable(str(tmp_path / 'new'), [str(run / 'epoch_12.pth')], 'done.json')
    with pytest.raises(ValueError, match=r'holds the input .*epoch_12.pth'):
        check_replaceable(str(run), [str(run / 'epoch_12.pth')], 'done.json')
    with pytest.raises(ValueError, match='holds the input'):  # the work dir under it
        check_replaceable(str(tmp_path), [str(run)], 'done.json')
    with pytest.raises(ValueError, match='a folder of other files'):
        check_replaceable(str(run), [], 'done.json')
    with pytest.raises(ValueError, match='is a file'):
        check_replaceable(str(run / 'epoch_12.pth'), [], 'done.json')
    (run / 'done.json').write_text('{}')  # an earlier output: replaced
    check_replaceable(str(run), [], 'done.json')
