from faceps.cli import main

raise SystemExit(main())
