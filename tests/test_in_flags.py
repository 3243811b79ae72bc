"""lomar.errors.in_flags: a library message, which names Python parameters, in a command's flags."""

from __future__ import annotations

from lomar.errors import in_flags

FLAGS = {"window_size": "--window-size", "num_windows": "--windows", "placement": "--window-placement",
         "patch": "--patch"}


def test_values_and_underscored_names_read_as_flags_and_prose_stays():
    message = ("num_windows=5 asks for more 7x7 windows than fit: the patch grid's window positions hold at most 2; "
               "pass num_windows <= 2, placement='distinct', or use a larger image; window_size must be >= 2")
    assert in_flags(message, FLAGS) == (
        "--windows 5 asks for more 7x7 windows than fit: the patch grid's window positions hold at most 2; "
        "pass --windows <= 2, --window-placement distinct, or use a larger image; --window-size must be >= 2")


def test_a_tuple_or_list_of_numbers_reads_as_the_flags_values():
    message = "(global_blocks=(0, 1)); give fewer (global_blocks=(1,)) or global_blocks=[2, 5]"
    assert in_flags(message, {"global_blocks": "--global-blocks"}) == (
        "(--global-blocks 0 1); give fewer (--global-blocks 1) or --global-blocks 2 5")


def test_names_inside_other_names_flags_or_attributes_are_left_alone():
    message = "config.window_size=3 and the --window-size flag; max_num_windows=2 and patch_size=8, patch grid"
    assert in_flags(message, FLAGS) == message
    assert in_flags(message, {}) == message


def test_paths_in_a_message_stay_whole_though_their_folders_are_named_as_parameters(tmp_path, capsys):
    # a sweep's folders are often named by their settings (hydra's runs/window_size=5/)
    message = ("cannot read /runs/window_size=5/last.pt, runs\\num_windows-4\\x.pt or sweep/patch=8: "
               "window_size=5: pass window_size <= 4")
    assert in_flags(message, FLAGS) == ("cannot read /runs/window_size=5/last.pt, runs\\num_windows-4\\x.pt or "
                                        "sweep/patch=8: --window-size 5: pass --window-size <= 4")
    from lomar.cli.app import main

    junk = tmp_path / "img_size-224" / "window_size=5" / "orig.pth"
    junk.parent.mkdir(parents=True)
    junk.write_text("not a checkpoint")
    assert main(["load-original", str(junk), "--to", str(tmp_path / "c.pt")]) == 2
    assert f"cannot read checkpoint {junk}: it is a text file" in capsys.readouterr().err


def test_a_python_alternative_the_command_has_no_flag_for_is_dropped():
    message = ("cannot infer the number of heads of this 40-wide, 2-deep model; pass num_heads=... to load_original, "
               "or convert it first: lomar load-original CKPT --num-heads N --to FILE")
    assert in_flags(message, {"img_size": "--img-size"}) == (
        "cannot infer the number of heads of this 40-wide, 2-deep model; convert it first: lomar load-original CKPT "
        "--num-heads N --to FILE")
    assert in_flags(message, {"num_heads": "--num-heads"}).count("--num-heads") == 2  # kept where the flag exists


def test_commands_reading_a_checkpoint_tell_their_user_what_to_type(tmp_path, capsys, labelled_folder):
    """finetune and knn have no --num-heads: the library's load_original alternative is none for their user; a
    finetune's encoder build errors name its flags."""
    from lomar.checkpoints.io import atomic_save
    from lomar.cli.app import main
    from lomar.models.vit import VisionTransformer, ViTConfig

    odd = tmp_path / "odd.pt"  # no RPE table, no saved settings, no standard width: its heads stay unknown
    atomic_save({"model": VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=40, depth=2,
                                                      num_heads=2, pos="abs")).state_dict()}, odd)
    encoder = tmp_path / "encoder.pt"  # heads from its RPE table
    atomic_save({"model": VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                      num_heads=2)).state_dict()}, encoder)
    finetune = ["finetune", "--data", str(labelled_folder), "--img-size", "32", "--workers", "0", "--device", "cpu",
                "--batch-size", "4", "--max-steps", "1", "--out", str(tmp_path / "run")]
    assert main(["export", str(odd), "--to", str(tmp_path / "out")]) == 2  # it has the flag: nothing else to do
    assert "cannot infer the number of heads of this 40-wide, 2-deep model; pass --num-heads N\n" in \
        capsys.readouterr().err
    for argv, words in [
        (["knn", str(odd), "--data", str(labelled_folder), "--device", "cpu"],
         f"; convert it first: lomar load-original {odd} --num-heads N --to FILE\n"),  # the file, pasteable
        ([*finetune, "--pretrained", str(odd)], f"; convert it first: lomar load-original {odd} --num-heads N --to "
                                                 f"FILE\n"),
        ([*finetune, "--pretrained", str(encoder), "--window-size", "2", "--global-blocks", "7"],
         "(--global-blocks takes indices 0..1)"),
        ([*finetune, "--pretrained", str(encoder), "--img-size", "36"],
         "--img-size 36 is not divisible by the encoder's patch_size 8"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and "load_original" not in err and "_size" not in err.replace("patch_size", ""), err
