"""Gateway: the public Recommender service — fan-out, merge, filters, ranking, history and feedback."""
