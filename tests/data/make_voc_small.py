"""Regenerate tests/data/voc_small (Pascal VOC layout) from the packaged photographs.

    python tests/data/make_voc_small.py

Boxes were placed by hand, by looking at the 320-px images with a 20-px grid drawn on them;
coordinates are VOC's 1-based inclusive pixel indices. Object names are ImageNet class names
(matched case-insensitively by ``tsgb eval pointing``) or VOC class names (``cat``, ``person``).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))

from make_photo_dir import sample_photos  # noqa: E402

# name -> [(object name, xmin, ymin, xmax, ymax)] in 0-based pixels of the 320-px image
BOXES = {
    "chelsea": [("cat", 0, 0, 280, 212)],
    "coffee": [("espresso", 90, 8, 225, 150)],
    "rocket": [("missile", 148, 65, 172, 205)],
    "camera": [("tripod", 140, 128, 258, 319), ("person", 0, 40, 215, 319)],
    "grace_hopper": [("military uniform", 0, 165, 272, 319), ("person", 20, 0, 272, 319)],
    "flower": [("daisy", 85, 42, 225, 180), ("daisy", 140, 195, 228, 213)],
}
MAX_SIDE = 320


def main():
    from PIL import Image
    root = os.path.join(HERE, "voc_small")
    os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
    os.makedirs(os.path.join(root, "Annotations"), exist_ok=True)
    photos = sample_photos()
    for name, objs in BOXES.items():
        im = Image.fromarray(photos[name])
        s = MAX_SIDE / max(im.size)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.LANCZOS)
        im.save(os.path.join(root, "JPEGImages", name + ".jpg"), quality=85)
        xml = ["<annotation>", "  <folder>voc_small</folder>", f"  <filename>{name}.jpg</filename>",
               f"  <size><width>{im.width}</width><height>{im.height}</height><depth>3</depth></size>"]
        for obj, x0, y0, x1, y1 in objs:
            xml += ["  <object>", f"    <name>{obj}</name>", "    <difficult>0</difficult>",
                    f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
                    f"<xmax>{x1 + 1}</xmax><ymax>{y1 + 1}</ymax></bndbox>", "  </object>"]
        xml.append("</annotation>")
        with open(os.path.join(root, "Annotations", name + ".xml"), "w") as f:
            f.write("\n".join(xml) + "\n")


if __name__ == "__main__":
    main()
