from specserve.train.data import corpus_files, is_heldout, pack, roff_to_text


def test_split_is_deterministic_and_disjoint(tmp_path):
    for i in range(60):
        (tmp_path / f"f{i}.py").write_text(f"x = {i}\n")
    train = corpus_files(tmp_path, "train")
    held = corpus_files(tmp_path, "heldout")
    assert len(train) + len(held) == 60 and held
    assert not set(train) & set(held)
    assert held == corpus_files(tmp_path, "heldout")
    assert all(is_heldout(p.name) for p in held)


def test_roff_to_text_keeps_words_drops_macros():
    src = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list\n.PP\n\\fB\\-a\\fR, all\n.B bold words\n'
    text = roff_to_text(src)
    assert "comment" not in text and ".TH" not in text
    assert "NAME" in text and "ls - list" in text and "-a, all" in text and "bold words" in text


def test_pack():
    import torch

    rows = pack(torch.arange(10, dtype=torch.int32), 4)
    assert rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
