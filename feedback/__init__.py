"""The feedback service: the comparison queue between the policy's rollouts and the people (or
programs) who judge them, and the judgments it exports as preference data.

    feedback-server serve  --store feedback.db          (or postgresql://...)
    feedback-server export --store feedback.db --out prefs.jsonl

One process, its own port: an HTTP/JSON API (feedback/http.py), the labeling page
(feedback/page.py), Prometheus metrics (feedback/metrics.py) over one store interface
(feedback/store.py) with two backends, SQLite (feedback/sqlite_store.py) and PostgreSQL
(feedback/postgres_store.py), under the queue's rules (feedback/queue.py). Trainers and labeling
programs use feedback/client.py and feedback/sender.py (standard library only). Nothing here
imports the reward server or the training side: they meet through this API and preference
JSONL. docs/feedback.md has the design.
"""

__version__ = "0.1.0"
