from ktlsd.cli import main

raise SystemExit(main())
