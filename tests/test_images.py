import io

import pytest
from PIL import Image

from pez_cli.errors import InputError
from pez_cli.images import collect_paths, load_image


def test_grayscale_and_cmyk_become_rgb(tmp_path):
    Image.new("L", (8, 8), 100).save(tmp_path / "g.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    g = load_image(tmp_path / "g.png")
    assert g.mode == "RGB" and g.getpixel((0, 0)) == (100, 100, 100)
    c = load_image(tmp_path / "c.jpg")
    assert c.mode == "RGB" and min(c.getpixel((0, 0))) > 240  # CMYK 0,0,0,0 is white


def test_rgba_transparency_is_white(tmp_path):
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    im.putpixel((1, 1), (255, 0, 0, 255))
    im.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (255, 0, 0)


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((2, 2), 1)
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((2, 2)) == (0, 0, 255)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    im = Image.new("I;16", (4, 4), 32896)  # about half of 65535
    im.save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = load_image(tmp_path / "deep.png")
    r, g, b = out.getpixel((0, 0))
    assert r == g == b and 126 <= r <= 130


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert Image.open(tmp_path / "rot.jpg").size == (40, 20)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_truncated_and_non_images_name_the_file(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cannot read image .*cut.png: truncated"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(InputError, match=r"not an image .*notes.png"):
        load_image(tmp_path / "notes.png")


def test_collect_folder_sorted_and_stdin(tmp_path):
    for name in ("b.png", "a.jpg", "c.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in collect_paths([str(tmp_path)])] == ["a.jpg", "b.png"]
    stdin = io.StringIO(f"{tmp_path / 'b.png'}\n\n{tmp_path / 'a.jpg'}\n")
    assert [p.name for p in collect_paths(["-"], stdin)] == ["b.png", "a.jpg"]


def test_collect_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or folder: .*nope.png"):
        collect_paths([str(tmp_path / "nope.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="folder .*empty has no images"):
        collect_paths([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="no images given"):
        collect_paths(["-"], io.StringIO("\n"))


def test_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.png").write_bytes(b"x")
    (tmp_path / "y.png").write_bytes(b"x")
    assert [p.name for p in collect_paths([str(tmp_path)])] == ["y.png"]
    assert [p.name for p in collect_paths([str(tmp_path)], recursive=True)] == ["x.png", "y.png"]


def test_stdin_is_read_a_block_at_a_time_and_names_across_blocks_stay_whole(monkeypatch):
    from pez_cli import images

    class Stdin:
        def __init__(self, data: bytes):
            self.buffer = io.BytesIO(data)
            self.reads = 0
            read = self.buffer.read

            def counted(n=-1):
                assert n > 0, "stdin read whole"
                self.reads += 1
                return read(n)

            self.buffer.read = counted

    monkeypatch.setattr(images, "STDIN_BLOCK", 7)
    names = ["/a/first image.png", "b\xe9.png", "c.png", "/long/" + "x" * 30 + ".jpg"]
    stdin = Stdin(("\r\n".join(names) + "\n\n").encode("utf-8"))
    found = images.stdin_paths(stdin)
    assert next(found) == names[0] and stdin.reads < 10  # the first name before the rest is read
    assert [names[0], *found] == names
    nul = Stdin(b"x.png\0y z.png\0\0w\n.png")
    assert list(images.stdin_paths(nul, null=True)) == ["x.png", "y z.png", "w\n.png"]
    with pytest.raises(InputError, match="separated by NUL bytes"):
        list(images.stdin_paths(Stdin(b"x.png\0y.png")))


def test_ray_partitions_are_whole_groups_about_four_per_worker():
    from pez_cli.ray_batch import PARTITION, partition_rows

    assert partition_rows(6, 2, 2) == 2  # few inputs: one group each, so every worker gets some
    assert partition_rows(1000, 16, 4) == 64  # 1000 / 16 partitions, rounded up to whole groups
    assert partition_rows(100_000, 16, 1) == PARTITION
    assert partition_rows(100_000, 100, 1) == 600  # at most PARTITION, rounded up to a whole group
    assert partition_rows(0, 16, 8) == 16
