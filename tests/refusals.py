"""The check the hostile model-file tests share: load_int_model refuses a file with a ValueError that
names the file and says what is wrong."""
import os

import pytest

from q2kernels.deploy import load_int_model


def expect_load_refused(path, *fragments) -> str:
    """Assert load_int_model(path) raises a ValueError naming `path` and containing every fragment;
    return the message."""
    with pytest.raises(ValueError) as e:
        load_int_model(path)
    msg = str(e.value)
    assert repr(os.fspath(path)) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg
