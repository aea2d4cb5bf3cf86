-- Ready queries on the patchq results database; each runs unchanged on SQLite and PostgreSQL
-- (tests/test_sql_queries.py runs every one on both). Parameters are written :name:
--   psql:     \set run_id 3   \set top_n 10     then paste the query
--   sqlite3:  .parameter set :run_id 3          then paste the query
-- Percentiles use the nearest-rank method with ROW_NUMBER, because SQLite has no
-- percentile_cont; integer arithmetic (rn * 100 >= p * n) keeps the cut exact on both.

-- name: top_anomalies
-- The :top_n highest-scoring images of each category in run :run_id, worst first.
SELECT ranked.category, ranked.rank_in_category, ranked.score, ranked.path,
       ranked.label, ranked.defect_type, ranked.worker
FROM (
    SELECT s.category, s.score, i.path, i.label, i.defect_type, s.worker,
           ROW_NUMBER() OVER (
               PARTITION BY s.category ORDER BY s.score DESC, s.image_id
           ) AS rank_in_category
    FROM scores AS s
    JOIN images AS i ON i.id = s.image_id
    WHERE s.run_id = :run_id
) AS ranked
WHERE ranked.rank_in_category <= :top_n
ORDER BY ranked.category, ranked.rank_in_category;

-- name: failure_reasons
-- Why images of run :run_id failed, grouped by reason (the image's own path is cut from the
-- message so that one reason on many files is one row), most frequent first, with one example.
SELECT category,
       REPLACE(error, path || ': ', '') AS reason,
       COUNT(*) AS images,
       MIN(path) AS example_path
FROM images
WHERE run_id = :run_id AND status = 'failed'
GROUP BY category, REPLACE(error, path || ': ', '')
ORDER BY images DESC, category, reason;

-- name: worker_throughput
-- Per worker process in run :run_id: images scored, busy seconds (sum of the per-image scoring
-- time), images per busy second, and the first and last score's time (their span is the
-- worker's wall-clock share of the run).
SELECT worker,
       COUNT(*) AS images,
       SUM(duration_ms) / 1000.0 AS busy_s,
       COUNT(*) * 1000.0 / NULLIF(SUM(duration_ms), 0) AS images_per_s,
       MIN(scored_at) AS first_scored_at,
       MAX(scored_at) AS last_scored_at
FROM scores
WHERE run_id = :run_id
GROUP BY worker
ORDER BY images DESC, worker;

-- name: score_distribution
-- Score distribution of each category in run :run_id: count, min, quartiles, p95, p99, max,
-- mean. A percentile p is the smallest score with at least p% of the scores at or below it.
SELECT category,
       COUNT(*) AS images,
       MIN(score) AS min_score,
       MIN(CASE WHEN rn * 100 >= 25 * n THEN score END) AS p25,
       MIN(CASE WHEN rn * 100 >= 50 * n THEN score END) AS median,
       MIN(CASE WHEN rn * 100 >= 75 * n THEN score END) AS p75,
       MIN(CASE WHEN rn * 100 >= 95 * n THEN score END) AS p95,
       MIN(CASE WHEN rn * 100 >= 99 * n THEN score END) AS p99,
       MAX(score) AS max_score,
       AVG(score) AS mean_score
FROM (
    SELECT category, score,
           ROW_NUMBER() OVER (PARTITION BY category ORDER BY score) AS rn,
           COUNT(*) OVER (PARTITION BY category) AS n
    FROM scores
    WHERE run_id = :run_id
) AS ranked
GROUP BY category
ORDER BY category;

-- name: review_verdicts
-- The verdict that counts for each reviewed image of run :run_id (its latest), who gave it,
-- and how many verdicts the image received in all (the history stays in reviews).
SELECT images.category,
       images.path,
       latest.verdict,
       latest.reviewer,
       latest.created_at AS reviewed_at,
       history.verdicts
FROM reviews AS latest
JOIN images ON images.id = latest.image_id
JOIN (
    SELECT image_id, MAX(id) AS latest_id, COUNT(*) AS verdicts
    FROM reviews
    WHERE run_id = :run_id
    GROUP BY image_id
) AS history ON history.latest_id = latest.id
ORDER BY images.category, images.path;
