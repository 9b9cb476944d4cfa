from megatron_dapo.cli import main

raise SystemExit(main())
