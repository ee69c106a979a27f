"""Print the README's N-th command (1: the demo, 2: the tests): .ci/run runs the second one."""
import re, sys
from pathlib import Path

text = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
blocks = re.findall(r'```bash\n(.*?)\n```', text, flags=re.S)
print(blocks[int(sys.argv[1]) - 1].strip())
