"""What every part of patchq shares: settings, errors and the scoring task body at the top;
the model in `engine/`, image input in `data/`, the SQL database in `store/`."""
