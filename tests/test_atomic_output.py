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
