from torchlars.demo.cli import main

raise SystemExit(main())
