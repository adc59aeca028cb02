"""``rm-server serve``'s configuration (rm_server/config.py): batch defaults per device, flags
win, and nonsensical numbers refused in one line. Ports: test_serve_startup.py."""

from __future__ import annotations

import pytest

from rm_server import cli
from rm_server.config import ServeConfig, batch_policy


def test_batch_defaults_follow_the_device_and_flags_win():
    cfg = ServeConfig(model="m")
    assert (batch_policy(cfg, "cpu").max_batch_size, batch_policy(cfg, "cpu").max_batch_tokens) \
        == (16, 1024)
    assert (batch_policy(cfg, "cuda").max_batch_size,
            batch_policy(cfg, "cuda").max_batch_tokens) == (32, 8192)
    mine = batch_policy(ServeConfig(model="m", max_batch_size=64, max_batch_tokens=4096), "cpu")
    assert (mine.max_batch_size, mine.max_batch_tokens) == (64, 4096)


@pytest.mark.parametrize("flag", ["--max-batch-size=0", "--max-batch-tokens=-5",
                                  "--max-queue=0", "--max-wait-ms=-1"])
def test_nonsensical_batch_flags_are_one_line_errors(flag, capsys, tmp_path):
    assert cli.main(["serve", "--model", str(tmp_path), flag]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag.split("=")[0] in err[0], err
