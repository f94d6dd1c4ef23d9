"""Ground-truth training data: BlenderProc renders in the reference's ``zero12345_narrow`` layout (spec §3, §6).

Pieces:

* :mod:`~training.render.render_views` — the BlenderProc script (a recipe: load, normalise, cameras, lights, render,
  write). Users with internet run it with ``blenderproc run training/render/render_views.py --object a.glb --out
  DIR``; offline it runs in-process on the ``bpy`` 4.2 wheel through :mod:`~training.render.launch_inprocess`.
* :mod:`~training.render.layout` — file names, folder ids, shards, the manifest and the render settings shared by the
  script (Blender's Python) and the driver (the main environment); numpy and the standard library only.
* :mod:`~training.render.procedural` — seeded textured, coloured compound shapes (numpy) for offline work and tests.
* :mod:`~training.render.sources` — what to render: procedural seeds, a local folder, or Objaverse-LVIS.
* :mod:`~training.render.driver` — ``one2345-train render``: selects objects, keeps this shard's unfinished ones,
  runs one Blender process over them and shows progress in objects/hour.

Scaling out. Every object is assigned to exactly one shard by hashing its uid (``--shard i/N``), so independent
processes need no coordination and can share one output folder (each writes its own manifest file). Finished objects
are skipped on re-runs, so a pre-empted job is simply started again.

* Slurm array job (one Blender process per task; Cycles uses all the task's cores)::

      #SBATCH --array=0-99 --cpus-per-task=8
      one2345-train render --source objaverse --out /data/one2345 --shard ${SLURM_ARRAY_TASK_ID}/100

* Ray (one task per shard; ``num_cpus`` reserves the cores Cycles will use)::

      import ray, subprocess
      @ray.remote(num_cpus=8)
      def shard(i, n):
          return subprocess.run(["one2345-train", "render", "--source", "objaverse", "--out", "/data/one2345",
                                 "--shard", f"{i}/{n}", "--threads", "8"]).returncode
      ray.get([shard.remote(i, 100) for i in range(100)])

Objaverse downloads happen in the driver before Blender starts; point ``--objaverse-cache`` at a shared disk so that
shards do not download the same file twice.

The BlenderProc script and :mod:`~training.render.layout` run inside Blender's Python: they import only the
standard library, numpy, bpy and BlenderProc; the driver may import :mod:`training` and :mod:`server`.
"""
