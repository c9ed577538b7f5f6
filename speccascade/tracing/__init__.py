"""``speccascade log-traces``: decode a task with the pair and write its trace rows, with outcome labels."""
