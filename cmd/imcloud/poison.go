package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"text/tabwriter"
	"time"

	"imcloud/adapters"
	"imcloud/pipeline"
)

// cmdPoison inspects and re-drives the poison queue.
func cmdPoison(ctx context.Context, args []string, stdout, stderr io.Writer, environ []string) error {
	var (
		cf  configFlags
		ids []string
		all bool
	)
	fs := newFlagSet("poison", `imcloud poison list|replay|purge [--id ID]... [--all] [--config F]
  list     show poisoned messages with their reason, handler and time
  replay   re-publish the chosen messages to the push topic
  purge    drop the chosen messages`, stderr)
	cf.register(fs)
	fs.StringSliceVar(&ids, "id", nil, "message ids to replay or purge (repeatable, or comma-separated)")
	fs.BoolVar(&all, "all", false, "replay or purge every poisoned message")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return errors.New("poison: want one of list, replay, purge")
	}
	action := fs.Arg(0)
	cfg, err := cf.load(environ, nil, "stages=job")
	if err != nil {
		return err
	}
	p, err := adapters.OpenPoison(cfg, slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		return err
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var sel pipeline.Selector
	if action != "list" {
		switch {
		case all && len(ids) > 0:
			return errors.New("poison: give --id or --all, not both")
		case all:
			sel = pipeline.All
		case len(ids) > 0:
			sel = pipeline.IDs(ids...)
		default:
			return fmt.Errorf("poison %s: say which messages with --id or --all", action)
		}
	}
	switch action {
	case "list":
		msgs, err := p.List(ctx)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tPOISONED AT\tHANDLER\tREASON")
		for _, m := range msgs {
			handler, reason := m.Handler(), m.Reason()
			if m.Undecodable != "" {
				// Not a message: it can only be purged, by this id.
				handler, reason = "-", "UNDECODABLE: "+m.Undecodable
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", m.ID, m.PoisonedAt.UTC().Format(time.RFC3339), handler, reason)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%d poisoned message(s) in %s\n", len(msgs), cfg.Topics.Poison)
	case "replay":
		n, err := p.Replay(ctx, sel)
		fmt.Fprintf(stdout, "replayed %d message(s) to %s\n", n, cfg.Topics.Push)
		return err
	case "purge":
		n, err := p.Purge(ctx, sel)
		fmt.Fprintf(stdout, "purged %d message(s)\n", n)
		return err
	default:
		return fmt.Errorf("poison: unknown action %q (want list, replay or purge)", action)
	}
	return nil
}
