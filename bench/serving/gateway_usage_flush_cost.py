"""Experiment: CPU per usage batch insert (SQLite, 2 / 50 / 500 rows) and per empty unit of work."""
import sys, tempfile, time, uuid
from datetime import datetime, timezone
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scheduler.migrate import upgrade
from serving.database import Database
from serving.usage_writer import insert_usage
tmp = tempfile.mkdtemp()
url = f"sqlite:///{tmp}/x.db"
upgrade(url)
db = Database.from_url(url)
def rows(n):
    return [dict(org_id="org", request_id=uuid.uuid4().hex, kind="inference", model="m", adapter=None, api_key_id=None, prompt_tokens=4,
                 completion_tokens=4, trained_tokens=0, latency_ms=1.0, status="ok", created_at=datetime.now(timezone.utc)) for _ in range(n)]
for n in (2, 50, 500):
    batches = [rows(n) for _ in range(40)]
    db.run_sync(lambda s: insert_usage(s, rows(n)))
    c, w = time.process_time(), time.perf_counter()
    for b in batches:
        db.run_sync(lambda s: insert_usage(s, b))
    print(n, "rows: cpu ms/batch", round((time.process_time() - c) / 40 * 1000, 2), "wall", round((time.perf_counter() - w) / 40 * 1000, 2))
def empty():
    with db.scope() as s:
        pass
c = time.process_time()
for _ in range(200): empty()
print("empty session_scope cpu ms", round((time.process_time() - c) / 200 * 1000, 3))
