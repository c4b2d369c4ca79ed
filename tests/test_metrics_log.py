import re

from unetseg.contract import metrics_log as ml


def test_line_format_and_parse_round_trip():
    metrics = {"train_loss": 0.12345678, "val_miou": 0.5, "lr": 3e-05, "val_iou_cell": float("nan")}
    line = ml.format_line(metrics, epoch=3)
    assert line.startswith("epoch=3 train_loss=0.123457 val_miou=0.5 lr=3e-05")
    parsed = ml.parse_line(line)
    assert parsed["epoch"] == 3 and parsed["lr"] == 3e-05 and parsed["train_loss"] == 0.123457
    assert ml.parse_line("resumed from epoch 3") == {}


def test_regexes_pick_each_metric_from_a_printed_line_and_nothing_else():
    names = ["background", "Cell nucleus"]
    values = {name: (i + 1) / 1000 for i, name in enumerate(ml.all_metric_names(names))}
    line = ml.format_line(values, epoch=7)
    definitions = ml.metric_definitions(names)
    assert [d["Name"] for d in definitions] == list(values)
    for d in definitions:
        found = re.findall(d["Regex"], line)
        assert found == [ml.format_value(values[d["Name"]])], d


def test_loss_regex_does_not_match_inside_train_loss():
    # \b stops val_iou from matching val_iou_background and loss from matching train_loss
    assert re.search(ml.regex_for("loss"), "epoch=1 train_loss=0.5") is None
    assert re.findall(ml.regex_for("val_iou"), "epoch=1 val_iou_background=0.5") == []


def test_class_names_become_metric_safe():
    assert ml.class_metric("val_iou", "Cell Nucleus (large)") == "val_iou_cell_nucleus_large"


def test_class_names_that_share_a_metric_name_are_found():
    assert ml.metric_name_clashes(["bg", "Cell Nucleus", "cell-nucleus", "edge", "EDGE"]) == [
        ["Cell Nucleus", "cell-nucleus"], ["edge", "EDGE"]]
    assert ml.metric_name_clashes(["bg", "cell", "cell_2"]) == []
