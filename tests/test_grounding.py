from cogvlm import parse_boxes


def test_parses_phrases_and_multiple_boxes():
    text = "a dog [[086,540,400,760;512,100,630,300]] and a cat[[000,000,999,999]]."
    g = parse_boxes(text, image_size=(1000, 500))
    assert g.errors == []
    assert [b.phrase for b in g.boxes] == ["a dog", "a dog", "and a cat"]
    assert g.boxes[0].box == (0.086, 0.54, 0.4, 0.76)
    assert g.boxes[0].box_pixels == (86, 270, 400, 380)
    assert g.boxes[2].box == (0.0, 0.0, 0.999, 0.999)


def test_no_boxes():
    g = parse_boxes("just a caption without boxes")
    assert g.boxes == [] and g.errors == []


def test_malformed_parts_are_reported_not_raised():
    text = ("x [[1,2,3]] y [[a,b,c,d]] z [[100,100,50,200]] w [[1000,0,5,5]] "
            "ok [[010,020,030,040]] tail [[010,02")
    g = parse_boxes(text)
    assert [b.phrase for b in g.boxes] == ["ok"]
    assert g.boxes[0].box_pixels is None
    assert len(g.errors) == 5
    assert any("unclosed" in e for e in g.errors)
    assert g.to_dict()["boxes"][0]["phrase"] == "ok"
