"""A spec's settings read as the command's flags: a quoted switch value is named by its key."""

import pytest

from lomar.cli.study.flags import parse_flags, settings_flags
from lomar.errors import UsageError
from lomar.train.config import add_config_arguments


def test_a_quoted_false_for_a_switch_names_the_key():
    """YAML's 'false' in quotes is a string: '--norm-pix-loss false' was refused as 'unrecognized arguments: false',
    naming neither the key nor the fix."""
    with pytest.raises(UsageError, match=r"^norm_pix_loss: 'false' must be true or false, unquoted "
                                         r"\(--norm-pix-loss takes no value\)$"):
        parse_flags(add_config_arguments, settings_flags({"depth": 2, "norm_pix_loss": "false"}))
    args = parse_flags(add_config_arguments, settings_flags({"norm_pix_loss": False, "crop_scale": [0.5, 1.0]}))
    assert args.norm_pix_loss is False and list(args.crop_scale) == [0.5, 1.0]
    with pytest.raises(UsageError, match="^unrecognized arguments: 2$"):  # one value too many: as before
        parse_flags(add_config_arguments, settings_flags({"crop_scale": [0.5, 1.0, 2]}))
