#!/usr/bin/env bash
# OCR check of a RUNNING gateway: an image and a 2-page PDF with known words are read back.
#   GATEWAY_PASSWORD=... ./scripts/test_ocr.sh
# Environment as for test_gateway.sh, plus GATEWAY_OCR_MODEL (ocr). The documents are drawn
# here with the project's Python (Pillow), so nothing is downloaded and nothing is checked in.
set -euo pipefail
# shellcheck source=scripts/api_checks.sh
. "$(dirname "$0")/api_checks.sh"
OCR_MODEL=${GATEWAY_OCR_MODEL:-ocr}
PYTHON=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK" "$_BODY_FILE"' EXIT

"$PYTHON" - "$WORK" <<'PY'
import sys
from pathlib import Path
from PIL import Image, ImageDraw, ImageFont

def page(lines):
    image = Image.new("RGB", (1000, 300), "white")
    draw = ImageDraw.Draw(image)
    for row, text in enumerate(lines):
        draw.text((40, 40 + row * 90), text, fill="black", font=ImageFont.load_default(size=48))
    return image

out = Path(sys.argv[1])
page(["GATEWAY OCR CHECK", "NUMBER 1234"]).save(out / "scan.png")
first, second = page(["FIRST PAGE APPLE"]), page(["SECOND PAGE BANANA"])
first.save(out / "two.pdf", save_all=True, append_images=[second], resolution=144.0)
PY

call POST /auth/token --data-urlencode "username=$GATEWAY_USER" --data-urlencode "password=$GATEWAY_PASSWORD"
expect "POST /auth/token gives a bearer token" 200 '.token_type == "bearer"'
TOKEN=$(field .access_token)
AUTH=(-H "Authorization: Bearer $TOKEN" -H "X-Client-ID: ocr-check")

call POST /api/ocr "${AUTH[@]}" -F "file=@$WORK/scan.png" -F "model=$OCR_MODEL"
expect "POST /api/ocr reads the words of a PNG" 200 '.status == "completed"' \
  '.text | test("GATEWAY")' '.text | test("1234")' '.pages | length == 1' '.resolution | type == "string"'

call POST /api/ocr "${AUTH[@]}" -H "X-Resolution: base" -F "file=@$WORK/two.pdf" -F "model=$OCR_MODEL"
expect "POST /api/ocr reads each page of a PDF" 200 '.mode == "base"' '.pages | length == 2' \
  '.pages[0].text | test("APPLE")' '.pages[1].text | test("BANANA")'

printf 'just some text\n' >"$WORK/notes.png"
call POST /api/ocr "${AUTH[@]}" -F "file=@$WORK/notes.png" -F "model=$OCR_MODEL"
expect "a text file named .png is refused with 400" 400 '.detail | test("not a supported image")'

call POST /api/ocr "${AUTH[@]}" -H "X-Resolution: huge" -F "file=@$WORK/scan.png" -F "model=$OCR_MODEL"
expect "an unknown X-Resolution is refused with 400" 400 '.detail | test("gundam")'

echo "PASS  $CHECKS OCR checks against $GATEWAY_URL"
