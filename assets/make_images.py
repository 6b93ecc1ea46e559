# Makes the bundled demo images (committed; this script documents how they were drawn).
from PIL import Image, ImageDraw
out = "assets/images/"
img = Image.new("RGB", (320, 240), (135, 190, 235)); d = ImageDraw.Draw(img)
d.rectangle([0, 170, 320, 240], fill=(70, 150, 60)); d.ellipse([230, 20, 290, 80], fill=(250, 220, 60))
d.rectangle([60, 110, 150, 175], fill=(180, 60, 50)); d.polygon([(50, 110), (105, 70), (160, 110)], fill=(120, 40, 30))
img.save(out + "house.jpg", quality=90)
img = Image.new("RGB", (256, 256), (240, 240, 235)); d = ImageDraw.Draw(img)
for i, c in enumerate([(220, 40, 40), (40, 160, 60), (40, 80, 220)]):
    d.ellipse([30 + 70 * i, 100, 90 + 70 * i, 160], fill=c)
img.save(out + "balls.png")
img = Image.new("RGBA", (200, 300), (0, 0, 0, 0)); d = ImageDraw.Draw(img)
d.rectangle([40, 40, 160, 260], fill=(30, 30, 30, 255)); d.rectangle([60, 60, 140, 120], fill=(255, 255, 255, 200))
img.save(out + "phone.png")
img = Image.new("L", (300, 200), 90); d = ImageDraw.Draw(img)
d.line([0, 0, 300, 200], fill=230, width=12); d.line([0, 200, 300, 0], fill=20, width=12)
img.save(out + "cross.webp")
